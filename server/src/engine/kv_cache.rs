//! The KV cache of one token sequence, shaped by an [`AttentionPolicy`].
//!
//! Keys are stored after RoPE, at each token's absolute position. Layers that
//! share a [`LayerAttention`] rule form a *group* and keep the same set of
//! positions. Buffers grow geometrically (no per-token reallocation or
//! concatenation); sparse groups drop what no later token can attend to in an
//! amortized compaction pass ([`KvCache::compact`]). Attention itself always
//! applies the policy's mask, so *when* entries are dropped never changes a
//! result: only memory.

use super::policy::{AttentionPolicy, LayerAttention, TokenLine};

/// Kept positions shared by all layers with the same attention rule.
#[derive(Clone, Debug)]
struct Group {
    rule: LayerAttention,
    /// Absolute positions of the kept entries, ascending.
    positions: Vec<u32>,
    /// One past the highest position ever evicted from this group (0 = none).
    evicted_upto: usize,
}

/// One layer's kept keys and values, `kv_dim` floats per entry.
#[derive(Clone, Debug)]
struct LayerKv {
    group: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// A read-only view of one layer's cache, for attention.
pub struct LayerView<'a> {
    /// Keys, `positions.len() × kv_dim`, row-major.
    pub k: &'a [f32],
    /// Values, same layout as `k`.
    pub v: &'a [f32],
    /// Absolute positions of the rows.
    pub positions: &'a [u32],
    /// The group this layer belongs to (layers of a group share masks).
    pub group: usize,
}

/// Figures a cache reports about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KvStats {
    /// Tokens processed (the sequence length).
    pub tokens: usize,
    /// Of those, anchors (line ends).
    pub anchors: usize,
    /// K/V entries kept, summed over layers.
    pub kept_entries: usize,
    /// Bytes of live K/V data.
    pub kv_bytes: usize,
    /// Bytes allocated for K/V (live data plus spare capacity).
    pub allocated_bytes: usize,
}

/// The KV cache of one sequence under one policy.
#[derive(Clone, Debug)]
pub struct KvCache {
    policy: AttentionPolicy,
    kv_dim: usize,
    lines: Vec<TokenLine>,
    groups: Vec<Group>,
    layers: Vec<LayerKv>,
    slack_lines: u32,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim` floats per token.
    pub fn new(policy: AttentionPolicy, n_layers: usize, kv_dim: usize) -> Self {
        let mut groups: Vec<Group> = Vec::new();
        let layers = (0..n_layers)
            .map(|l| {
                let rule = policy.layer(l);
                let group = match groups.iter().position(|g| g.rule == rule) {
                    Some(g) => g,
                    None => {
                        groups.push(Group { rule, positions: Vec::new(), evicted_upto: 0 });
                        groups.len() - 1
                    }
                };
                LayerKv { group, k: Vec::new(), v: Vec::new() }
            })
            .collect();
        KvCache { policy, kv_dim, lines: Vec::new(), groups, layers, slack_lines: 0 }
    }

    /// Keep `lines` more lines of full K/V than the policy needs (16 tokens a
    /// line for window layers) before evicting, so that edits that close to
    /// the end stay local. Changes memory only, never results.
    pub fn set_eviction_slack(&mut self, lines: u32) {
        self.slack_lines = lines;
    }

    /// The rule compaction evicts by: the group's own, widened by the slack.
    fn eviction_rule(&self, rule: LayerAttention) -> LayerAttention {
        rule.with_slack(self.slack_lines)
    }

    /// The policy this cache follows.
    pub fn policy(&self) -> &AttentionPolicy {
        &self.policy
    }

    /// Make the first `n` tokens sinks (always kept, always attended): a
    /// document's lead tokens (BOS, project context). Only on an empty cache,
    /// since it changes what every later token attends to.
    pub fn set_sink_tokens(&mut self, n: u32) {
        assert!(self.lines.is_empty(), "sinks change on an empty cache only");
        self.policy.sink_tokens = n;
    }

    /// Number of tokens processed.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no token was processed yet.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Line structure of every processed token.
    pub fn lines(&self) -> &[TokenLine] {
        &self.lines
    }

    /// Number of layer groups (distinct attention rules).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Register `anchors.len()` new tokens at the end of the sequence; their
    /// K/V must then be written to every layer with [`KvCache::append`].
    /// Returns the position of the first new token.
    pub fn begin_chunk(&mut self, anchors: &[bool]) -> usize {
        let start = self.lines.len();
        let mut next_line = self.lines.last().map_or(0, |t| t.next_line());
        for &anchor in anchors {
            self.lines.push(TokenLine { line: next_line, anchor });
            next_line += anchor as u32;
        }
        for g in &mut self.groups {
            g.positions.extend((start..start + anchors.len()).map(|p| p as u32));
        }
        start
    }

    /// Append the K/V rows of the current chunk to layer `layer`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        grow(&mut l.k, k.len());
        grow(&mut l.v, v.len());
        l.k.extend_from_slice(k);
        l.v.extend_from_slice(v);
        debug_assert_eq!(l.k.len(), self.groups[l.group].positions.len() * self.kv_dim);
    }

    /// The kept K/V of `layer`.
    pub fn layer(&self, layer: usize) -> LayerView<'_> {
        let l = &self.layers[layer];
        LayerView { k: &l.k, v: &l.v, positions: &self.groups[l.group].positions, group: l.group }
    }

    /// The additive mask (0 or −∞) of queries `q0..q0 + n` over the kept
    /// entries of `group`: `n × kept` floats.
    pub fn mask_bias(&self, group: usize, q0: usize, n: usize) -> Vec<f32> {
        let g = &self.groups[group];
        let sinks = self.policy.sink_tokens;
        let mut bias = vec![0f32; n * g.positions.len()];
        for (a, row) in bias.chunks_mut(g.positions.len().max(1)).enumerate().take(n) {
            let q = q0 + a;
            let ql = self.lines[q];
            for (slot, &k) in row.iter_mut().zip(&g.positions) {
                let k = k as usize;
                if !g.rule.allows(sinks, q, ql, k, self.lines[k]) {
                    *slot = f32::NEG_INFINITY;
                }
            }
        }
        bias
    }

    /// Drop every token at position `len` and later.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.lines.len() {
            return;
        }
        self.lines.truncate(len);
        for g in &mut self.groups {
            let keep = g.positions.partition_point(|&p| (p as usize) < len);
            g.positions.truncate(keep);
        }
        for l in &mut self.layers {
            let keep = self.groups[l.group].positions.len() * self.kv_dim;
            l.k.truncate(keep);
            l.v.truncate(keep);
        }
    }

    /// The longest prefix that stays exact if the tokens from `pos` on change:
    /// `pos` itself, unless recomputing from there needs K/V that a sparse
    /// group already evicted; then 0 (recompute everything).
    pub fn reusable_prefix(&self, pos: usize) -> usize {
        if pos >= self.lines.len() {
            return pos.min(self.lines.len());
        }
        let sinks = self.policy.sink_tokens;
        let ok = self
            .groups
            .iter()
            .all(|g| g.evicted_upto == 0 || g.rule.needs_from(sinks, pos, &self.lines) >= g.evicted_upto);
        if ok {
            pos
        } else {
            0
        }
    }

    /// Evict entries that no later token can attend to. Unless `force`, a group
    /// is compacted only once enough entries are dead to pay for the copy (64,
    /// or a quarter of its entries while it grows).
    pub fn compact(&mut self, force: bool) {
        self.compact_when(|entries| if force { 1 } else { 64.max(entries / 4) });
    }

    /// Compaction for a cache at rest (the document idle): every group with 64
    /// or more dead entries, so that an idle cache holds what its policy keeps
    /// (with the slack), not up to a quarter more; fewer are not worth the copy.
    /// Then every buffer keeps at most [`IDLE_HEADROOM_ROWS`] rows of spare
    /// capacity (room to type into), not the growth headroom of a prefill.
    pub fn compact_idle(&mut self) {
        self.compact_when(|_| 64);
        let headroom = IDLE_HEADROOM_ROWS * self.kv_dim;
        for l in &mut self.layers {
            for buf in [&mut l.k, &mut l.v] {
                if buf.capacity() > buf.len() + 2 * headroom {
                    buf.shrink_to(buf.len() + headroom);
                }
            }
        }
    }

    /// Compact each sparse group whose dead entries reach `min_dead(entries)`.
    fn compact_when(&mut self, min_dead: impl Fn(usize) -> usize) {
        let Some(last) = self.lines.last() else { return };
        let (next, next_line) = (self.lines.len(), last.next_line());
        let sinks = self.policy.sink_tokens;
        let rules: Vec<LayerAttention> = self.groups.iter().map(|g| self.eviction_rule(g.rule)).collect();
        for (gi, g) in self.groups.iter_mut().enumerate() {
            if !g.rule.is_sparse() {
                continue;
            }
            let rule = rules[gi];
            let keep: Vec<bool> = g
                .positions
                .iter()
                .map(|&p| !rule.evictable(sinks, p as usize, self.lines[p as usize], next, next_line))
                .collect();
            let n_dead = keep.iter().filter(|&&k| !k).count();
            if n_dead == 0 || n_dead < min_dead(g.positions.len()) {
                continue;
            }
            // Positions ascend, so the last dead one is the highest.
            let max_dead = g.positions.iter().zip(&keep).filter(|(_, &k)| !k).map(|(&p, _)| p).next_back();
            for l in self.layers.iter_mut().filter(|l| l.group == gi) {
                retain_rows(&mut l.k, self.kv_dim, &keep);
                retain_rows(&mut l.v, self.kv_dim, &keep);
                trim(&mut l.k);
                trim(&mut l.v);
            }
            let mut flags = keep.iter();
            g.positions.retain(|_| *flags.next().expect("one flag per position"));
            if let Some(p) = max_dead {
                g.evicted_upto = g.evicted_upto.max(p as usize + 1);
            }
        }
    }

    /// Memory and size figures.
    pub fn stats(&self) -> KvStats {
        let f = std::mem::size_of::<f32>();
        let kept_entries: usize = self.layers.iter().map(|l| self.groups[l.group].positions.len()).sum();
        KvStats {
            tokens: self.lines.len(),
            anchors: self.lines.iter().filter(|t| t.anchor).count(),
            kept_entries,
            kv_bytes: kept_entries * self.kv_dim * 2 * f,
            allocated_bytes: self.layers.iter().map(|l| (l.k.capacity() + l.v.capacity()) * f).sum(),
        }
    }
}

/// Spare rows an idle cache keeps per buffer ([`KvCache::compact_idle`]).
const IDLE_HEADROOM_ROWS: usize = 64;

/// Make room for `extra` more floats, growing by a quarter rather than Vec's
/// doubling: caches live long and their allocation counts against the
/// memory budget (still amortized O(1) per row).
fn grow(buf: &mut Vec<f32>, extra: usize) {
    if buf.capacity() - buf.len() < extra {
        buf.reserve_exact(extra.max(buf.len() / 4));
    }
}

/// After compaction, give back capacity beyond a quarter of headroom (the
/// peak of a long prefill would otherwise stay allocated).
fn trim(buf: &mut Vec<f32>) {
    let keep = buf.len() + buf.len() / 4;
    if buf.capacity() > keep + keep / 2 {
        buf.shrink_to(keep);
    }
}

/// Keep the rows (of `dim` floats) whose flag is set, in order, in place.
fn retain_rows(buf: &mut Vec<f32>, dim: usize, keep: &[bool]) {
    let mut w = 0;
    for (r, &k) in keep.iter().enumerate() {
        if k {
            if w != r {
                buf.copy_within(r * dim..(r + 1) * dim, w * dim);
            }
            w += 1;
        }
    }
    buf.truncate(w * dim);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::PolicyKind;

    fn fill(cache: &mut KvCache, anchors: &[bool], n_layers: usize) {
        let start = cache.begin_chunk(anchors);
        for l in 0..n_layers {
            let rows: Vec<f32> = (0..anchors.len()).flat_map(|i| [(start + i) as f32, l as f32]).collect();
            cache.append(l, &rows, &rows);
        }
    }

    #[test]
    fn compaction_keeps_rows_aligned_with_positions() {
        let policy = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 2 }, sink_tokens: 1 };
        let mut c = KvCache::new(policy, 4, 2);
        let anchors: Vec<bool> = (0..200).map(|i| i % 5 == 4).collect();
        fill(&mut c, &anchors, 4);
        c.compact(true);
        for l in 0..4 {
            let v = c.layer(l);
            assert_eq!(v.k.len(), v.positions.len() * 2);
            for (row, &p) in v.k.chunks(2).zip(v.positions) {
                assert_eq!(row, &[p as f32, l as f32]);
            }
        }
        // Dense layers keep all; sparse ones keep sink, anchors and the open line.
        assert_eq!(c.layer(0).positions.len(), 200);
        assert_eq!(c.layer(1).positions.len(), 1 + 40);
        let s = c.stats();
        assert_eq!(s.kept_entries, 2 * 200 + 2 * 41);
        assert_eq!(s.kv_bytes, s.kept_entries * 2 * 2 * 4);
    }

    #[test]
    fn spare_capacity_stays_bounded_through_prefill_and_compaction() {
        let policy = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 0 }, sink_tokens: 4 };
        let mut c = KvCache::new(policy, 2, 2);
        let anchors: Vec<bool> = (0..4000).map(|i| i % 16 == 15).collect();
        for chunk in anchors.chunks(256) {
            fill(&mut c, chunk, 2);
            c.compact(false);
        }
        c.compact(true);
        let s = c.stats();
        // Sinks, 250 anchors and the open line are live; the prefill's peak is not kept.
        assert_eq!(s.kept_entries, 2 * (4 + 250));
        assert!(s.allocated_bytes <= s.kv_bytes * 2, "{s:?}");
        // Growth by appends is geometric but gentle: at most 1.25x + one chunk.
        let mut d = KvCache::new(AttentionPolicy::full(), 1, 2);
        for chunk in anchors.chunks(100) {
            fill(&mut d, chunk, 1);
            let s = d.stats();
            assert!(s.allocated_bytes <= s.kv_bytes * 5 / 4 + 100 * 2 * 2 * 4, "{s:?}");
        }
    }

    #[test]
    fn an_idle_window_cache_holds_its_window_not_the_lazy_surplus() {
        let policy = AttentionPolicy { kind: PolicyKind::Window { window_tokens: 500 }, sink_tokens: 4 };
        let mut c = KvCache::new(policy, 2, 2);
        let anchors: Vec<bool> = (0..1200).map(|i| i % 16 == 15).collect();
        let mut filled = 0;
        for chunk in anchors.chunks(64) {
            fill(&mut c, chunk, 2);
            filled += chunk.len();
            c.compact(false);
        }
        assert_eq!(filled, 1200);
        // While prefilling, up to a quarter more than the window stays.
        let lazy = c.stats().kept_entries / 2;
        assert!(lazy > 504 + 64, "the lazy rule left {lazy} entries a layer");
        c.compact_idle();
        // Sinks + the window (the next token itself is its last position).
        assert_eq!(c.stats().kept_entries / 2, 4 + 499, "sinks + window once idle");
        // At rest, little spare capacity is left (2 layers, K and V, dim 2).
        let s = c.stats();
        assert!(s.allocated_bytes <= s.kv_bytes + 2 * 2 * 2 * 2 * 4 * IDLE_HEADROOM_ROWS, "{s:?}");
        // A few dead entries are not worth a copy.
        fill(&mut c, &[false; 10], 2);
        c.compact_idle();
        assert_eq!(c.stats().kept_entries / 2, 4 + 499 + 10);
    }

    #[test]
    fn truncate_and_reusable_prefix() {
        let policy = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 1, dense_every: 0 }, sink_tokens: 1 };
        let mut c = KvCache::new(policy, 2, 2);
        let anchors: Vec<bool> = (0..100).map(|i| i % 10 == 9).collect();
        fill(&mut c, &anchors, 2);
        let mut slack = c.clone();
        // Nothing evicted yet: any prefix is reusable.
        assert_eq!(c.reusable_prefix(5), 5);
        c.compact(true);
        // Ten lines are closed: lines 0..=8 lost their non-anchor K/V, so an edit
        // in line 9 (which needs line 8) recomputes everything.
        assert_eq!(c.reusable_prefix(95), 0);
        // With two lines of slack only lines 0..=6 go: line 9 is still local.
        slack.set_eviction_slack(2);
        slack.compact(true);
        // Kept: the sink, 7 anchors of lines 0..=6, and lines 7..=9 whole.
        assert_eq!(slack.layer(0).positions.len(), 1 + 7 + 30);
        assert_eq!(slack.reusable_prefix(95), 95);
        assert_eq!(slack.reusable_prefix(75), 0);
        c = slack;
        c.truncate(95);
        assert_eq!(c.len(), 95);
        let v = c.layer(1);
        assert!(v.positions.iter().all(|&p| p < 95));
        assert_eq!(v.k.len(), v.positions.len() * 2);
    }
}
