//! The KV cache of one token sequence, shaped by an [`AttentionPolicy`].
//!
//! Keys are stored after RoPE, at each token's absolute position. Layers that
//! share a [`LayerAttention`] rule form a *group* and keep the same set of
//! positions. Buffers grow geometrically (no per-token reallocation or
//! concatenation); sparse groups drop what no later token can attend to in an
//! amortized compaction pass ([`KvCache::compact`]). Attention itself always
//! applies the policy's mask, so *when* entries are dropped never changes a
//! result: only memory. Rows are kept head-major (a buffer per KV head), the
//! order in which attention reads them.

use half::f16;

use super::policy::{AttentionPolicy, LayerAttention, TokenLine};

/// How K/V rows are stored: `q8` (the default: a byte a value and a scale a
/// row, about a quarter of `f32`), `f16` (half of `f32`, what llama.cpp
/// keeps; the default for models with key biases, [`KvPrecision::for_model`])
/// or `f32` (exact, the reference). Attention widens rows to `f32` as it reads
/// them. Why: docs/benchmarks.md, "q8 K/V by default".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    /// IEEE half precision (11-bit significand: relative rounding ≤ 2⁻¹¹).
    F16,
    /// Single precision, as computed.
    F32,
    /// Each row of a head (`head_dim` values) as signed bytes times one `f32`
    /// scale (its largest magnitude / 127): rounding ≤ 1/254 of that
    /// magnitude. Decode at depth reads the K/V of every kept row for each
    /// token, so bytes a row are time a token.
    #[default]
    Q8,
}

impl KvPrecision {
    /// Bytes per stored value (a `q8` row also stores its 4-byte scale:
    /// [`KvPrecision::row_bytes`]).
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F16 => 2,
            KvPrecision::F32 => 4,
            KvPrecision::Q8 => 1,
        }
    }

    /// Bytes one head's row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        head_dim * self.bytes() + if self == KvPrecision::Q8 { Q8_SCALE_BYTES } else { 0 }
    }

    /// The name `ANCHORCODER_KV` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvPrecision::F16 => "f16",
            KvPrecision::F32 => "f32",
            KvPrecision::Q8 => "q8",
        }
    }

    /// `f16`, `f32` or `q8`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" => Ok(KvPrecision::F16),
            "f32" => Ok(KvPrecision::F32),
            "q8" => Ok(KvPrecision::Q8),
            other => Err(format!("unknown K/V precision {other:?} (expected f16, f32 or q8)")),
        }
    }

    /// The process-wide choice: what `ANCHORCODER_KV=q8|f16|f32` names, else
    /// q8. An unknown value is reported on stderr and the default kept.
    pub fn from_env() -> Self {
        KvPrecision::explicit().unwrap_or_default()
    }

    /// What `ANCHORCODER_KV` names, if it names one (read once).
    pub fn explicit() -> Option<Self> {
        static CHOICE: std::sync::OnceLock<Option<KvPrecision>> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("ANCHORCODER_KV") {
            Ok(v) if !v.trim().is_empty() => KvPrecision::parse(&v)
                .map_err(|e| eprintln!("anchorcoder: ANCHORCODER_KV: {e}; using the default"))
                .ok(),
            _ => None,
        })
    }

    /// The precision for a model's caches: what `ANCHORCODER_KV` names; else
    /// q8, or f16 (what llama.cpp keeps) for a model that adds a bias to its
    /// keys (Qwen2, StarCoder2). The conformance test's Qwen2 model, whose key
    /// bias stays a large shared offset in the dimensions RoPE barely turns,
    /// lost 5 points of top-1 agreement with llama.cpp with q8 rows; the
    /// models without biases lost 1–2 (server/tests/conformance.rs).
    pub fn for_model(key_bias: bool) -> Self {
        match KvPrecision::explicit() {
            Some(p) => p,
            None if key_bias => KvPrecision::F16,
            None => KvPrecision::default(),
        }
    }
}

/// Bytes of a `q8` row's scale, stored little-endian before its values.
pub const Q8_SCALE_BYTES: usize = 4;

/// A stored K/V value type: `f32`, or `f16` (rounded to nearest), or `i8`
/// (a `q8` row: [`Q8_SCALE_BYTES`] of scale, then the values).
trait Stored: Copy + Default + std::fmt::Debug {
    /// Elements a row of `head_dim` values takes beyond `head_dim`.
    const EXTRA: usize = 0;
    /// Store one row: `dst` (`src.len() + EXTRA` elements) ← `src`.
    fn put(dst: &mut [Self], src: &[f32]);
}

impl Stored for f32 {
    fn put(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

impl Stored for f16 {
    fn put(dst: &mut [f16], src: &[f32]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
}

impl Stored for i8 {
    const EXTRA: usize = Q8_SCALE_BYTES;
    fn put(dst: &mut [i8], src: &[f32]) {
        let max = src.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = max / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let (head, values) = dst.split_at_mut(Q8_SCALE_BYTES);
        for (d, b) in head.iter_mut().zip(scale.to_le_bytes()) {
            *d = b as i8;
        }
        for (d, x) in values.iter_mut().zip(src) {
            // |x · inv| ≤ 127 (up to rounding of inv: clamped).
            *d = (x * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// The scale of the `q8` row that starts at `row[0]`.
#[inline(always)]
pub fn q8_scale(row: &[i8]) -> f32 {
    f32::from_le_bytes([row[0] as u8, row[1] as u8, row[2] as u8, row[3] as u8])
}

/// One `q8` row (scale, then values) widened into `out` (its values).
fn widen_q8(row: &[i8], out: &mut [f32]) {
    let scale = q8_scale(row);
    out.iter_mut().zip(&row[Q8_SCALE_BYTES..]).for_each(|(o, &q)| *o = q as f32 * scale);
}

/// One layer's K or V, *head-major*: a buffer per KV head, `head_dim` values
/// per row, so that attention reads each head's rows as one sequential stream
/// (row-major, a head's run of a row is a strided slice that the hardware
/// prefetchers follow badly once the weights have evicted it).
#[derive(Clone, Debug)]
struct HeadBufs<T> {
    heads: Vec<Vec<T>>,
    /// Elements a row takes (`head_dim + T::EXTRA`).
    width: usize,
}

impl<T: Stored> HeadBufs<T> {
    fn new(n_heads: usize, head_dim: usize) -> Self {
        HeadBufs { heads: vec![Vec::new(); n_heads], width: head_dim + T::EXTRA }
    }

    /// Elements held, over all heads.
    fn len(&self) -> usize {
        self.heads.iter().map(Vec::len).sum()
    }

    /// Elements allocated, over all heads.
    fn capacity(&self) -> usize {
        self.heads.iter().map(Vec::capacity).sum()
    }

    /// Append rows given row-major (`n_heads · head_dim` values each).
    fn extend(&mut self, x: &[f32]) {
        let (width, n_heads) = (self.width, self.heads.len());
        let hd = width - T::EXTRA;
        let rows = x.len() / (hd * n_heads);
        debug_assert_eq!(x.len(), rows * hd * n_heads);
        for (h, buf) in self.heads.iter_mut().enumerate() {
            grow(buf, rows * width);
            let at = buf.len();
            buf.resize(at + rows * width, T::default());
            for (r, dst) in buf[at..].chunks_exact_mut(width).enumerate() {
                let src = (r * n_heads + h) * hd;
                T::put(dst, &x[src..src + hd]);
            }
        }
    }

    /// Keep the first `rows` rows.
    fn truncate(&mut self, rows: usize) {
        self.heads.iter_mut().for_each(|b| b.truncate(rows * self.width));
    }

    /// Keep the rows whose flag is set, in order, in place; then give back
    /// capacity a long prefill left ([`trim`]).
    fn retain_rows(&mut self, keep: &[bool]) {
        for b in &mut self.heads {
            retain_rows(b, self.width, keep);
            trim(b);
        }
    }

    /// Shrink each head's spare capacity to `rows` rows if it exceeds twice that.
    fn shrink_spare(&mut self, rows: usize) {
        let headroom = rows * self.width;
        for b in &mut self.heads {
            if b.capacity() > b.len() + 2 * headroom {
                b.shrink_to(b.len() + headroom);
            }
        }
    }
}

/// One buffer set of K or V rows in the cache's precision.
#[derive(Clone, Debug)]
enum Rows {
    F32(HeadBufs<f32>),
    F16(HeadBufs<f16>),
    Q8(HeadBufs<i8>),
}

/// `$body` with `$b` bound to the [`HeadBufs`] inside a [`Rows`].
macro_rules! each {
    ($rows:expr, $b:ident => $body:expr) => {
        match $rows {
            Rows::F32($b) => $body,
            Rows::F16($b) => $body,
            Rows::Q8($b) => $body,
        }
    };
}

impl Rows {
    fn new(p: KvPrecision, n_heads: usize, head_dim: usize) -> Rows {
        match p {
            KvPrecision::F16 => Rows::F16(HeadBufs::new(n_heads, head_dim)),
            KvPrecision::F32 => Rows::F32(HeadBufs::new(n_heads, head_dim)),
            KvPrecision::Q8 => Rows::Q8(HeadBufs::new(n_heads, head_dim)),
        }
    }

    fn view(&self) -> KvRows<'_> {
        match self {
            Rows::F32(b) => KvRows::F32(&b.heads),
            Rows::F16(b) => KvRows::F16(&b.heads),
            Rows::Q8(b) => KvRows::Q8(&b.heads, b.width - Q8_SCALE_BYTES),
        }
    }

    fn len(&self) -> usize {
        each!(self, b => b.len())
    }

    fn capacity(&self) -> usize {
        each!(self, b => b.capacity())
    }

    fn extend(&mut self, x: &[f32]) {
        each!(self, b => b.extend(x))
    }

    fn truncate(&mut self, rows: usize) {
        each!(self, b => b.truncate(rows))
    }

    fn retain_rows(&mut self, keep: &[bool]) {
        each!(self, b => b.retain_rows(keep))
    }

    fn shrink_spare(&mut self, rows: usize) {
        each!(self, b => b.shrink_spare(rows))
    }
}

/// Read-only K or V rows of one layer, in the cache's precision: a buffer
/// per KV head ([`KvRows::head`]).
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    /// Stored as `f32`.
    F32(&'a [Vec<f32>]),
    /// Stored as `f16`.
    F16(&'a [Vec<f16>]),
    /// Stored as `q8` rows of `head_dim` (the second field) values.
    Q8(&'a [Vec<i8>], usize),
}

impl<'a> KvRows<'a> {
    /// Number of KV heads.
    pub fn heads(&self) -> usize {
        match self {
            KvRows::F32(h) => h.len(),
            KvRows::F16(h) => h.len(),
            KvRows::Q8(h, _) => h.len(),
        }
    }

    /// Values held over all heads (rows × kv_dim).
    pub fn len(&self) -> usize {
        (0..self.heads()).map(|h| self.head(h).len()).sum()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of KV head `h`, `head_dim` values each, one after another.
    pub fn head(&self, h: usize) -> KvHead<'a> {
        match *self {
            KvRows::F32(b) => KvHead::F32(&b[h]),
            KvRows::F16(b) => KvHead::F16(&b[h]),
            KvRows::Q8(b, hd) => KvHead::Q8(&b[h], hd),
        }
    }
}

/// The rows of one KV head, in the cache's precision.
#[derive(Clone, Copy, Debug)]
pub enum KvHead<'a> {
    /// Stored as `f32`.
    F32(&'a [f32]),
    /// Stored as `f16`.
    F16(&'a [f16]),
    /// Stored as `q8` rows ([`Q8_SCALE_BYTES`] of scale, then `head_dim`
    /// values; the second field is `head_dim`).
    Q8(&'a [i8], usize),
}

impl<'a> KvHead<'a> {
    /// Values held (rows × head_dim).
    pub fn len(&self) -> usize {
        match self {
            KvHead::F32(v) => v.len(),
            KvHead::F16(v) => v.len(),
            KvHead::Q8(v, hd) => v.len() / (hd + Q8_SCALE_BYTES) * hd,
        }
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `buf.len()` values from `at` as `f32`: borrowed when stored so,
    /// else widened into `buf`. For `q8`, `at` must start a row and `buf`
    /// hold one row.
    #[inline]
    pub fn row<'s>(&'s self, at: usize, buf: &'s mut [f32]) -> &'s [f32] {
        match *self {
            KvHead::F32(v) => &v[at..at + buf.len()],
            KvHead::F16(v) => {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&v[at..at + buf.len()], buf);
                buf
            }
            KvHead::Q8(v, hd) => {
                debug_assert!(at.is_multiple_of(hd) && buf.len() == hd);
                let w = hd + Q8_SCALE_BYTES;
                widen_q8(&v[at / hd * w..][..w], buf);
                buf
            }
        }
    }

    /// Every value as `f32` (borrowed when stored so).
    pub fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            KvHead::F32(v) => std::borrow::Cow::Borrowed(v),
            KvHead::F16(v) => {
                let mut out = vec![0f32; v.len()];
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(v, &mut out);
                std::borrow::Cow::Owned(out)
            }
            KvHead::Q8(v, hd) => {
                let mut out = vec![0f32; self.len()];
                for (o, row) in out.chunks_exact_mut(hd).zip(v.chunks_exact(hd + Q8_SCALE_BYTES)) {
                    widen_q8(row, o);
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Kept positions shared by all layers with the same attention rule.
#[derive(Clone, Debug)]
struct Group {
    rule: LayerAttention,
    /// Absolute positions of the kept entries, ascending.
    positions: Vec<u32>,
    /// One past the highest position ever evicted from this group (0 = none).
    evicted_upto: usize,
}

/// One layer's kept keys and values, `kv_heads × head_dim` values per entry.
#[derive(Clone, Debug)]
struct LayerKv {
    group: usize,
    k: Rows,
    v: Rows,
}

/// A read-only view of one layer's cache, for attention.
pub struct LayerView<'a> {
    /// Keys, head-major: per KV head, `positions.len() × head_dim`.
    pub k: KvRows<'a>,
    /// Values, same layout as `k`.
    pub v: KvRows<'a>,
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
    precision: KvPrecision,
    lines: Vec<TokenLine>,
    groups: Vec<Group>,
    layers: Vec<LayerKv>,
    slack_lines: u32,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_heads` heads of `head_dim`
    /// values per token, in the process-wide precision
    /// ([`KvPrecision::from_env`]).
    pub fn new(policy: AttentionPolicy, n_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        KvCache::with_precision(policy, n_layers, kv_heads, head_dim, KvPrecision::from_env())
    }

    /// An empty cache storing K/V rows in `precision`.
    pub fn with_precision(
        policy: AttentionPolicy,
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        precision: KvPrecision,
    ) -> Self {
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
                let rows = || Rows::new(precision, kv_heads, head_dim);
                LayerKv { group, k: rows(), v: rows() }
            })
            .collect();
        KvCache { policy, kv_dim: kv_heads * head_dim, precision, lines: Vec::new(), groups, layers, slack_lines: 0 }
    }

    /// How this cache stores K/V rows.
    pub fn precision(&self) -> KvPrecision {
        self.precision
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

    /// Append the K/V rows of the current chunk to layer `layer` (row-major:
    /// `kv_heads × head_dim` values a token, as the projections give them).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        l.k.extend(k);
        l.v.extend(v);
        debug_assert_eq!(l.k.view().len(), self.groups[l.group].positions.len() * self.kv_dim);
    }

    /// The kept K/V of `layer`.
    pub fn layer(&self, layer: usize) -> LayerView<'_> {
        let l = &self.layers[layer];
        LayerView { k: l.k.view(), v: l.v.view(), positions: &self.groups[l.group].positions, group: l.group }
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
            // What was evicted at or after `len` is gone with the rest.
            g.evicted_upto = g.evicted_upto.min(len);
        }
        for l in &mut self.layers {
            let keep = self.groups[l.group].positions.len();
            l.k.truncate(keep);
            l.v.truncate(keep);
        }
    }

    /// The longest prefix that stays exact if the tokens from `pos` on change:
    /// `pos` itself, unless recomputing from there needs K/V that a sparse
    /// group already evicted; then the sink tokens (never evicted, and
    /// recomputing after them needs nothing else). So a window that moved
    /// keeps a lead of project context (its sinks) however much of the old
    /// text was evicted.
    pub fn reusable_prefix(&self, pos: usize) -> usize {
        if pos >= self.lines.len() {
            return pos.min(self.lines.len());
        }
        let sinks = self.policy.sink_tokens;
        // Evicted entries lie below `evicted_upto`; the tokens from `pos` on
        // need the entries from `needs_from` up to `pos`.
        let ok = self.groups.iter().all(|g| g.rule.needs_from(sinks, pos, &self.lines) >= g.evicted_upto.min(pos));
        if ok {
            pos
        } else {
            (sinks as usize).min(pos)
        }
    }

    /// Evict entries that no later token can attend to. Unless `force`, a group
    /// is compacted only once enough entries are dead to pay for the copy (64,
    /// or a quarter of its entries past the sinks while it grows: a long
    /// context lead, all sinks, must not let dead rows pile up that every
    /// decoded token still walks past).
    pub fn compact(&mut self, force: bool) {
        let sinks = self.policy.sink_tokens as usize;
        self.compact_when(|entries| if force { 1 } else { 64.max(entries.saturating_sub(sinks) / 4) });
    }

    /// Compaction for a cache at rest (the document idle): every group with 64
    /// or more dead entries, so that an idle cache holds what its policy keeps
    /// (with the slack), not up to a quarter more; fewer are not worth the copy.
    /// Then every buffer keeps at most [`IDLE_HEADROOM_ROWS`] rows of spare
    /// capacity (room to type into), not the growth headroom of a prefill.
    pub fn compact_idle(&mut self) {
        self.compact_when(|_| 64);
        for l in &mut self.layers {
            l.k.shrink_spare(IDLE_HEADROOM_ROWS);
            l.v.shrink_spare(IDLE_HEADROOM_ROWS);
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
                l.k.retain_rows(&keep);
                l.v.retain_rows(&keep);
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
        let f = self.precision.bytes();
        let kept_entries: usize = self.layers.iter().map(|l| self.groups[l.group].positions.len()).sum();
        KvStats {
            tokens: self.lines.len(),
            anchors: self.lines.iter().filter(|t| t.anchor).count(),
            kept_entries,
            kv_bytes: self.layers.iter().map(|l| (l.k.len() + l.v.len()) * f).sum(),
            allocated_bytes: self.layers.iter().map(|l| (l.k.capacity() + l.v.capacity()) * f).sum(),
        }
    }
}

/// Spare rows an idle cache keeps per head buffer ([`KvCache::compact_idle`]).
const IDLE_HEADROOM_ROWS: usize = 64;

/// Make room for `extra` more values, growing by a quarter rather than Vec's
/// doubling: caches live long and their allocation counts against the
/// memory budget (still amortized O(1) per row).
fn grow<T>(buf: &mut Vec<T>, extra: usize) {
    if buf.capacity() - buf.len() < extra {
        buf.reserve_exact(extra.max(buf.len() / 4));
    }
}

/// After compaction, give back capacity beyond a quarter of headroom (the
/// peak of a long prefill would otherwise stay allocated).
fn trim<T>(buf: &mut Vec<T>) {
    let keep = buf.len() + buf.len() / 4;
    if buf.capacity() > keep + keep / 2 {
        buf.shrink_to(keep);
    }
}

/// Keep the rows (of `dim` values) whose flag is set, in order, in place.
fn retain_rows<T: Copy>(buf: &mut Vec<T>, dim: usize, keep: &[bool]) {
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

    /// Rows of two values, `[position, layer]`.
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
        for precision in [KvPrecision::F16, KvPrecision::F32] {
            // Two KV heads of one value: head 0 keeps positions, head 1 layers.
            let mut c = KvCache::with_precision(policy, 4, 2, 1, precision);
            let anchors: Vec<bool> = (0..200).map(|i| i % 5 == 4).collect();
            fill(&mut c, &anchors, 4);
            c.compact(true);
            for l in 0..4 {
                let v = c.layer(l);
                assert_eq!((v.k.len(), v.k.heads()), (v.positions.len() * 2, 2));
                // Integers below 2,048 are exact in f16.
                let want: Vec<f32> = v.positions.iter().map(|&p| p as f32).collect();
                assert_eq!(v.k.head(0).to_f32().as_ref(), &want[..]);
                assert_eq!(v.v.head(0).to_f32().as_ref(), &want[..]);
                assert!(v.k.head(1).to_f32().iter().all(|&x| x == l as f32));
            }
            // Dense layers keep all; sparse ones keep sink, anchors and the open line.
            assert_eq!(c.layer(0).positions.len(), 200);
            assert_eq!(c.layer(1).positions.len(), 1 + 40);
            let s = c.stats();
            assert_eq!(s.kept_entries, 2 * 200 + 2 * 41);
            assert_eq!(s.kv_bytes, s.kept_entries * 2 * 2 * precision.bytes());
        }
    }

    #[test]
    fn f16_rows_round_to_nearest_and_halve_the_bytes() {
        let mut h = KvCache::with_precision(AttentionPolicy::full(), 1, 1, 4, KvPrecision::F16);
        let mut f = KvCache::with_precision(AttentionPolicy::full(), 1, 1, 4, KvPrecision::F32);
        let row = [1.0f32 / 3.0, -1234.567, 6.1e-5, 65504.0];
        for c in [&mut h, &mut f] {
            c.begin_chunk(&[false]);
            c.append(0, &row, &row);
        }
        assert_eq!(f.layer(0).k.head(0).to_f32().as_ref(), &row);
        for (got, want) in h.layer(0).v.head(0).to_f32().iter().zip(row) {
            assert!((got - want).abs() <= want.abs() * 2f32.powi(-11), "{got} vs {want}");
        }
        assert_eq!(h.stats().kv_bytes * 2, f.stats().kv_bytes);
        assert_eq!(KvPrecision::parse(" F32 "), Ok(KvPrecision::F32));
        assert!(KvPrecision::parse("bf16").is_err());
    }

    #[test]
    fn q8_rows_keep_a_scale_each_and_survive_compaction() {
        // Two heads of 8 values, three rows of different magnitudes.
        let (heads, hd) = (2, 8);
        let rows: Vec<f32> =
            (0..3 * heads * hd).map(|i| ((i * 37 % 19) as f32 - 9.0) * [0.01, 1.0, 300.0][i / 16]).collect();
        let policy = AttentionPolicy { kind: PolicyKind::Window { window_tokens: 2 }, sink_tokens: 0 };
        let mut c = KvCache::with_precision(policy, 1, heads, hd, KvPrecision::Q8);
        c.begin_chunk(&[false; 3]);
        c.append(0, &rows, &rows);
        let check = |c: &KvCache, kept: &[usize]| {
            let view = c.layer(0);
            for h in 0..heads {
                let got = view.k.head(h).to_f32();
                assert_eq!(got.len(), kept.len() * hd);
                for (i, &r) in kept.iter().enumerate() {
                    let want = &rows[(r * heads + h) * hd..][..hd];
                    let max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let mut buf = vec![0f32; hd];
                    let row = view.v.head(h).row(i * hd, &mut buf).to_vec();
                    for ((g, w), g2) in got[i * hd..][..hd].iter().zip(want).zip(&row) {
                        assert!((g - w).abs() <= max / 254.0 * 1.001, "row {r} head {h}: {g} vs {w}");
                        assert_eq!(g, g2, "row() and to_f32() agree");
                    }
                }
            }
        };
        check(&c, &[0, 1, 2]);
        // A byte a value plus a 4-byte scale a row, K and V.
        assert_eq!(c.stats().kv_bytes, 2 * 3 * heads * KvPrecision::Q8.row_bytes(hd));
        assert_eq!(KvPrecision::Q8.row_bytes(hd), hd + Q8_SCALE_BYTES);
        // A window of two keeps the last row (the next token sees it): compaction moves whole rows, scales with them.
        c.compact(true);
        check(&c, &[2]);
        assert_eq!(c.stats().kv_bytes, 2 * heads * KvPrecision::Q8.row_bytes(hd));
        assert_eq!(KvPrecision::parse("q8"), Ok(KvPrecision::Q8));
    }

    #[test]
    fn spare_capacity_stays_bounded_through_prefill_and_compaction() {
        let policy = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 0 }, sink_tokens: 4 };
        let mut c = KvCache::new(policy, 2, 1, 2);
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
        let mut d = KvCache::new(AttentionPolicy::full(), 1, 2, 1);
        for chunk in anchors.chunks(100) {
            fill(&mut d, chunk, 1);
            let s = d.stats();
            assert!(s.allocated_bytes <= s.kv_bytes * 5 / 4 + 100 * 2 * 2 * d.precision().row_bytes(1), "{s:?}");
        }
    }

    #[test]
    fn an_idle_window_cache_holds_its_window_not_the_lazy_surplus() {
        let policy = AttentionPolicy { kind: PolicyKind::Window { window_tokens: 500 }, sink_tokens: 4 };
        let mut c = KvCache::new(policy, 2, 1, 2);
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
        // At rest, little spare capacity is left (2 layers, K and V, rows of dim 2, twice over).
        let s = c.stats();
        assert!(s.allocated_bytes <= s.kv_bytes + 2 * 2 * 2 * c.precision().row_bytes(2) * IDLE_HEADROOM_ROWS, "{s:?}");
        // A few dead entries are not worth a copy.
        fill(&mut c, &[false; 10], 2);
        c.compact_idle();
        assert_eq!(c.stats().kept_entries / 2, 4 + 499 + 10);
    }

    #[test]
    fn a_long_lead_of_sinks_does_not_let_dead_rows_pile_up() {
        // A project context of 460 tokens kept as sinks before a 500-token
        // window: the dead rows allowed before compacting are a quarter of
        // the window's entries (~170), not of all of them (~320).
        let policy = AttentionPolicy { kind: PolicyKind::Window { window_tokens: 500 }, sink_tokens: 460 };
        let mut c = KvCache::new(policy, 1, 1, 2);
        let anchors: Vec<bool> = (0..2000).map(|i| i % 16 == 15).collect();
        let mut most = 0;
        for chunk in anchors.chunks(16) {
            fill(&mut c, chunk, 1);
            most = most.max(c.stats().kept_entries);
            c.compact(false);
        }
        assert!(most > 460 + 500 + 64, "compaction is still lazy: {most}");
        assert!(most <= 460 + 500 + 170 + 16, "{most} entries kept at most");
    }

    #[test]
    fn truncate_and_reusable_prefix() {
        let policy = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 1, dense_every: 0 }, sink_tokens: 1 };
        let mut c = KvCache::new(policy, 2, 1, 2);
        let anchors: Vec<bool> = (0..100).map(|i| i % 10 == 9).collect();
        fill(&mut c, &anchors, 2);
        let mut slack = c.clone();
        // Nothing evicted yet: any prefix is reusable.
        assert_eq!(c.reusable_prefix(5), 5);
        c.compact(true);
        // Ten lines are closed: lines 0..=8 lost their non-anchor K/V, so an edit
        // in line 9 (which needs line 8) recomputes all but the sink.
        assert_eq!(c.reusable_prefix(95), 1);
        // With two lines of slack only lines 0..=6 go: line 9 is still local.
        slack.set_eviction_slack(2);
        slack.compact(true);
        // Kept: the sink, 7 anchors of lines 0..=6, and lines 7..=9 whole.
        assert_eq!(slack.layer(0).positions.len(), 1 + 7 + 30);
        assert_eq!(slack.reusable_prefix(95), 95);
        assert_eq!(slack.reusable_prefix(75), 1);
        c = slack;
        c.truncate(95);
        assert_eq!(c.len(), 95);
        let v = c.layer(1);
        assert!(v.positions.iter().all(|&p| p < 95));
        assert_eq!(v.k.len(), v.positions.len() * 2);
        // A cut keeps the evictions below it (lines 0..=6 still need recomputing)...
        c.truncate(60);
        assert_eq!(c.reusable_prefix(55), 1);
        // ...and a cut below every eviction forgets them: any prefix is reusable again.
        c.truncate(1);
        fill(&mut c, &anchors[..40], 2);
        assert_eq!(c.reusable_prefix(25), 25, "nothing was evicted since");
    }
}
