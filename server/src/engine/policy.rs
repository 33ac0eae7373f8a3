//! Attention policies: which earlier tokens each token may attend to.
//!
//! One [`AttentionPolicy`] gives every layer a [`LayerAttention`]. The same
//! rule ([`LayerAttention::allows`]) builds the mask of a one-shot forward pass
//! ([`AttentionPolicy::mask`]) and decides what the incremental KV cache may
//! drop ([`LayerAttention::evictable`]), so the two agree by construction.
//!
//! Terms:
//! - an *anchor* is a token whose bytes contain a newline (it ends a line);
//! - a token's *line* is the number of anchors before it, so an anchor
//!   belongs to the line it ends;
//! - the first `sink_tokens` tokens of the sequence are attention sinks.

use anyhow::{bail, Result};

/// What one token is, as far as attention masks are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLine {
    /// Number of anchors before this token.
    pub line: u32,
    /// Whether this token ends a line.
    pub anchor: bool,
}

impl TokenLine {
    /// Line structure of a token sequence from each token's anchor flag.
    pub fn from_anchors(anchors: impl IntoIterator<Item = bool>) -> Vec<TokenLine> {
        let mut line = 0u32;
        anchors
            .into_iter()
            .map(|anchor| {
                let t = TokenLine { line, anchor };
                line += anchor as u32;
                t
            })
            .collect()
    }

    /// The line of the token that follows this one.
    pub fn next_line(self) -> u32 {
        self.line + self.anchor as u32
    }
}

/// The attention rule of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerAttention {
    /// Plain causal attention: every earlier token.
    Dense,
    /// Sinks, every earlier anchor, and the tokens of the own line and the
    /// `recent_lines` lines before it.
    Anchor { recent_lines: u32 },
    /// Sinks and the last `window_tokens` tokens (StreamingLLM style).
    Window { window_tokens: u32 },
}

impl LayerAttention {
    /// Whether the query token at `q` may attend to the key token at `k`.
    #[inline]
    pub fn allows(self, sinks: u32, q: usize, ql: TokenLine, k: usize, kl: TokenLine) -> bool {
        if k > q {
            return false;
        }
        match self {
            LayerAttention::Dense => true,
            LayerAttention::Anchor { recent_lines } => {
                k < sinks as usize || kl.anchor || ql.line - kl.line <= recent_lines
            }
            LayerAttention::Window { window_tokens } => k < sinks as usize || q - k < window_tokens as usize,
        }
    }

    /// Whether no token at position `next` or later (whose line is at least
    /// `next_line`) can ever attend to the key token at `k` again.
    #[inline]
    pub fn evictable(self, sinks: u32, k: usize, kl: TokenLine, next: usize, next_line: u32) -> bool {
        if k < sinks as usize {
            return false;
        }
        match self {
            LayerAttention::Dense => false,
            LayerAttention::Anchor { recent_lines } => !kl.anchor && next_line - kl.line > recent_lines,
            LayerAttention::Window { window_tokens } => next - k >= window_tokens as usize,
        }
    }

    /// The first position whose full K/V a token at `q` may need: recomputing
    /// from `q` is exact only if nothing at or after it was evicted.
    pub fn needs_from(self, sinks: u32, q: usize, lines: &[TokenLine]) -> usize {
        match self {
            LayerAttention::Dense => 0,
            LayerAttention::Anchor { recent_lines } => {
                let first_line = lines[q].line.saturating_sub(recent_lines);
                // Lines are non-decreasing: find the first token of `first_line`.
                lines[..=q].partition_point(|t| t.line < first_line)
            }
            LayerAttention::Window { window_tokens } => (q + 1).saturating_sub(window_tokens as usize),
        }
        .max(sinks as usize)
        .min(q)
    }

    /// Whether this layer ever evicts anything.
    pub fn is_sparse(self) -> bool {
        self != LayerAttention::Dense
    }

    /// This rule keeping `lines` more lines (16 tokens a line for a window)
    /// before it evicts: what a cache evicts by so that edits that close to
    /// the end stay local. Anchor layers without recent lines keep no line
    /// in full, so there is nothing to widen.
    pub fn with_slack(self, lines: u32) -> LayerAttention {
        match self {
            LayerAttention::Anchor { recent_lines } if recent_lines > 0 => {
                LayerAttention::Anchor { recent_lines: recent_lines + lines }
            }
            LayerAttention::Window { window_tokens } => {
                LayerAttention::Window { window_tokens: window_tokens + 16 * lines }
            }
            other => other,
        }
    }
}

/// Which policy family, with its own knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Line-end anchors plus `recent_lines` of full K/V; every `dense_every`-th
    /// layer (0 = none) dense.
    Anchor { recent_lines: u32, dense_every: u32 },
    /// Full causal attention everywhere.
    Full,
    /// Sinks plus the last `window_tokens` tokens in every layer.
    Window { window_tokens: u32 },
}

/// The policy families, by the names settings, flags and adapters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyName {
    /// Keep anchors (line ends), sinks and recent lines.
    Anchor,
    /// Keep everything.
    Full,
    /// Keep sinks and the last `windowTokens` tokens (the server's default).
    #[default]
    Window,
}

impl PolicyName {
    /// All names, as written in settings.
    pub const ALL: [PolicyName; 3] = [Self::Anchor, Self::Full, Self::Window];

    /// The name as written in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anchor => "anchor",
            Self::Full => "full",
            Self::Window => "window",
        }
    }

    /// Parses a name (exact, lowercase).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|policy| policy.as_str() == name)
    }
}

impl std::str::FromStr for PolicyName {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        PolicyName::parse(name)
            .ok_or_else(|| anyhow::anyhow!("unknown attention policy `{name}` (expected anchor, full or window)"))
    }
}

impl std::fmt::Display for PolicyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy as settings, flags and adapters spell it: the family and every
/// knob (a family ignores the knobs it has no use for). The server's
/// `attention.*` settings are this type (`config::AttentionConfig`), and its
/// defaults are theirs; [`AttentionPolicy::from_spec`] makes the policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Which attention policy to use.
    pub policy: PolicyName,
    /// Lines before the cursor's line whose tokens stay fully visible (anchor policy).
    pub recent_lines: u32,
    /// Leading "attention sink" tokens always kept (anchor and window policies).
    pub sink_tokens: u32,
    /// Every N-th layer attends densely (anchor policy); 0 = none.
    pub dense_every: u32,
    /// Tokens kept by the sliding-window policy.
    pub window_tokens: u32,
}

/// The defaults were chosen from measurements (docs/benchmarks.md, "Quality
/// against KV bytes"): on documents that fill the 2,048-token prompt, a
/// 560-token window kept the default model's full-attention quality at 27% of
/// its KV bytes, while training-free anchors lost 10-22% at every budget.
impl Default for PolicySpec {
    fn default() -> Self {
        Self { policy: PolicyName::Window, recent_lines: 8, sink_tokens: 4, dense_every: 0, window_tokens: 560 }
    }
}

/// What each token may attend to, in every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionPolicy {
    /// The policy family and its knobs.
    pub kind: PolicyKind,
    /// The first tokens of the sequence, always kept (attention sinks).
    pub sink_tokens: u32,
}

impl AttentionPolicy {
    /// The anchor policy with its usual knobs: 8 recent lines, 4 sinks, no
    /// dense layers (what the benchmarks and tests call "anchor"). Not the
    /// server's default policy: that is `config::AttentionConfig::default()`.
    pub fn standard_anchor() -> Self {
        AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 8, dense_every: 0 }, sink_tokens: 4 }
    }

    /// Full causal attention (no sinks needed).
    pub fn full() -> Self {
        AttentionPolicy { kind: PolicyKind::Full, sink_tokens: 0 }
    }

    /// The policy a spec spells (settings, flags, an adapter's metadata).
    pub fn from_spec(s: &PolicySpec) -> Result<Self> {
        let kind = match s.policy {
            PolicyName::Anchor => PolicyKind::Anchor { recent_lines: s.recent_lines, dense_every: s.dense_every },
            PolicyName::Full => PolicyKind::Full,
            PolicyName::Window => {
                if s.window_tokens == 0 {
                    bail!("the window policy needs windowTokens > 0");
                }
                PolicyKind::Window { window_tokens: s.window_tokens }
            }
        };
        Ok(AttentionPolicy { kind, sink_tokens: s.sink_tokens })
    }

    /// The attention rule of layer `layer`.
    pub fn layer(&self, layer: usize) -> LayerAttention {
        match self.kind {
            PolicyKind::Full => LayerAttention::Dense,
            PolicyKind::Window { window_tokens } => LayerAttention::Window { window_tokens },
            PolicyKind::Anchor { recent_lines, dense_every } => {
                if dense_every > 0 && layer.is_multiple_of(dense_every as usize) {
                    LayerAttention::Dense
                } else {
                    LayerAttention::Anchor { recent_lines }
                }
            }
        }
    }

    /// The one-shot mask of layer `layer` over a whole sequence: row `q`,
    /// column `k` is true when `q` may attend to `k`.
    pub fn mask(&self, layer: usize, lines: &[TokenLine]) -> Vec<Vec<bool>> {
        let rule = self.layer(layer);
        (0..lines.len())
            .map(|q| (0..lines.len()).map(|k| rule.allows(self.sink_tokens, q, lines[q], k, lines[k])).collect())
            .collect()
    }

    /// A short human-readable description, e.g. `anchor(R=8, S=4, dense_every=0)`.
    pub fn describe(&self) -> String {
        match self.kind {
            PolicyKind::Full => "full".to_string(),
            PolicyKind::Anchor { recent_lines, dense_every } => {
                format!("anchor(R={recent_lines}, S={}, dense_every={dense_every})", self.sink_tokens)
            }
            PolicyKind::Window { window_tokens } => {
                format!("window(W={window_tokens}, S={})", self.sink_tokens)
            }
        }
    }

    /// The policy as JSON, with the configuration's key names.
    pub fn to_json(&self) -> serde_json::Value {
        let (name, r, d, w) = match self.kind {
            PolicyKind::Full => ("full", None, None, None),
            PolicyKind::Anchor { recent_lines, dense_every } => ("anchor", Some(recent_lines), Some(dense_every), None),
            PolicyKind::Window { window_tokens } => ("window", None, None, Some(window_tokens)),
        };
        serde_json::json!({
            "policy": name, "recentLines": r, "denseEvery": d,
            "windowTokens": w, "sinkTokens": self.sink_tokens,
        })
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // masks are indexed [query][key], as in the paper
mod tests {
    use super::*;

    fn lines(anchors: &[u8]) -> Vec<TokenLine> {
        TokenLine::from_anchors(anchors.iter().map(|&a| a == 1))
    }

    #[test]
    fn line_numbers_count_anchors_before() {
        let l = lines(&[0, 1, 0, 0, 1, 1, 0]);
        let got: Vec<u32> = l.iter().map(|t| t.line).collect();
        assert_eq!(got, vec![0, 0, 1, 1, 1, 2, 3]);
    }

    #[test]
    fn anchor_mask_r0_sees_sinks_anchors_and_own_line() {
        // Tokens: 0 1 | 2 3 4\n | 5 6\n | 7 8
        let l = lines(&[0, 0, 0, 0, 1, 0, 1, 0, 0]);
        let p = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 0 }, sink_tokens: 1 };
        let m = p.mask(1, &l);
        let row: Vec<usize> = (0..9).filter(|&k| m[8][k]).collect();
        // sink 0, anchors 4 and 6, own line 7 8.
        assert_eq!(row, vec![0, 4, 6, 7, 8]);
        // The anchor at 6 sees its own line (5, 6), earlier anchors and the sink.
        let row: Vec<usize> = (0..9).filter(|&k| m[6][k]).collect();
        assert_eq!(row, vec![0, 4, 5, 6]);
    }

    #[test]
    fn recent_lines_widen_the_view() {
        let l = lines(&[0, 1, 0, 1, 0, 1, 0]);
        let p = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 1, dense_every: 0 }, sink_tokens: 0 };
        let m = p.mask(0, &l);
        let row: Vec<usize> = (0..7).filter(|&k| m[6][k]).collect();
        assert_eq!(row, vec![1, 3, 4, 5, 6]);
    }

    #[test]
    fn dense_every_makes_layers_dense() {
        let p = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 4 }, sink_tokens: 4 };
        let dense: Vec<usize> = (0..10).filter(|&l| p.layer(l) == LayerAttention::Dense).collect();
        assert_eq!(dense, vec![0, 4, 8]);
    }

    #[test]
    fn window_mask_and_eviction_agree() {
        let l = lines(&[0; 12]);
        let p = AttentionPolicy { kind: PolicyKind::Window { window_tokens: 3 }, sink_tokens: 2 };
        let m = p.mask(0, &l);
        let row: Vec<usize> = (0..12).filter(|&k| m[11][k]).collect();
        assert_eq!(row, vec![0, 1, 9, 10, 11]);
        // Whatever is evictable before token q is masked for q and all later tokens.
        let rule = p.layer(0);
        for next in 0..12 {
            for k in 0..next {
                if rule.evictable(2, k, l[k], next, l[next].line) {
                    for q in next..12 {
                        assert!(!m[q][k], "evicted {k} but {q} attends to it");
                    }
                }
            }
        }
    }

    #[test]
    fn anchor_eviction_never_drops_what_a_later_token_needs() {
        let l = lines(&[0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0]);
        for r in 0..3 {
            let p = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: r, dense_every: 0 }, sink_tokens: 1 };
            let m = p.mask(0, &l);
            let rule = p.layer(0);
            for next in 1..l.len() {
                let next_line = l[next - 1].next_line();
                for k in 0..next {
                    let ev = rule.evictable(1, k, l[k], next, next_line);
                    let needed = (next..l.len()).any(|q| m[q][k]);
                    assert!(!(ev && needed), "R={r}: evicted {k} before {next} but needed");
                    if !ev && k >= 1 && !l[k].anchor {
                        assert!(needed || next_line - l[k].line <= r);
                    }
                }
            }
            // needs_from: every key a token attends to lies at or after it.
            for q in 0..l.len() {
                let from = rule.needs_from(1, q, &l);
                for k in 1..from {
                    assert!(!m[q][k] || l[k].anchor, "q={q} needs {k} < {from}");
                }
            }
        }
    }

    #[test]
    fn specs_make_policies_and_bad_names_or_knobs_are_refused() {
        let err = "sparse".parse::<PolicyName>().unwrap_err().to_string();
        assert_eq!(err, "unknown attention policy `sparse` (expected anchor, full or window)");
        let spec = |policy, recent_lines, dense_every, window_tokens| PolicySpec {
            policy,
            recent_lines,
            sink_tokens: 4,
            dense_every,
            window_tokens,
        };
        assert!(AttentionPolicy::from_spec(&spec(PolicyName::Window, 0, 0, 0)).is_err());
        let p = AttentionPolicy::from_spec(&spec(PolicyName::Anchor, 2, 4, 0)).unwrap();
        assert_eq!(p.describe(), "anchor(R=2, S=4, dense_every=4)");
        let d = AttentionPolicy::from_spec(&PolicySpec::default()).unwrap();
        assert_eq!(d.describe(), "window(W=560, S=4)", "the server's default");
        for name in PolicyName::ALL {
            assert_eq!(name.as_str().parse::<PolicyName>().unwrap(), name);
        }
    }

    #[test]
    fn slack_widens_only_rules_that_keep_lines_or_a_window() {
        assert_eq!(
            LayerAttention::Anchor { recent_lines: 2 }.with_slack(8),
            LayerAttention::Anchor { recent_lines: 10 }
        );
        assert_eq!(
            LayerAttention::Anchor { recent_lines: 0 }.with_slack(8),
            LayerAttention::Anchor { recent_lines: 0 }
        );
        assert_eq!(
            LayerAttention::Window { window_tokens: 560 }.with_slack(8),
            LayerAttention::Window { window_tokens: 688 }
        );
        assert_eq!(LayerAttention::Dense.with_slack(8), LayerAttention::Dense);
    }
}
