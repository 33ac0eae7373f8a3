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

    /// Build a policy from its name and knobs, as the CLI and the server
    /// configuration spell them.
    pub fn from_parts(
        name: &str,
        recent_lines: u32,
        sink_tokens: u32,
        dense_every: u32,
        window_tokens: u32,
    ) -> Result<Self> {
        let kind = match name {
            "anchor" => PolicyKind::Anchor { recent_lines, dense_every },
            "full" => PolicyKind::Full,
            "window" => {
                if window_tokens == 0 {
                    bail!("the window policy needs windowTokens > 0");
                }
                PolicyKind::Window { window_tokens }
            }
            other => bail!("unknown attention policy `{other}` (expected anchor, full or window)"),
        };
        Ok(AttentionPolicy { kind, sink_tokens })
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
    fn from_parts_rejects_bad_names() {
        assert!(AttentionPolicy::from_parts("sparse", 0, 4, 0, 0).is_err());
        assert!(AttentionPolicy::from_parts("window", 0, 4, 0, 0).is_err());
        let p = AttentionPolicy::from_parts("anchor", 2, 4, 4, 0).unwrap();
        assert_eq!(p.describe(), "anchor(R=2, S=4, dense_every=4)");
    }
}
