//! Masked multi-head attention over a layer's kept K/V.
//!
//! K/V rows come in the cache's precision ([`KvRows`]: `f16` by default,
//! widened to `f32` as they are read; `f32` as the exact reference), and
//! head-major: each KV head's rows one after another.
//!
//! - Prefill (several query rows): the layer's K/V are widened once, then
//!   every (query head, block of [`ROW_BLOCK`] query rows) is two `gemm`
//!   products on strided slices (scores, then probabilities × values),
//!   written straight into the output. A block only multiplies the runs of
//!   columns some of its rows may see (causality: the first chunk of a prompt
//!   does about half the work of the full square; a window cache's evicted
//!   rows, masked until compaction, are skipped).
//! - Decode (one query row, and passes of up to [`SMALL_PASS`] rows, row by
//!   row): each K and V row is read (and widened) once for
//!   all the query heads that share it (grouped-query attention), over
//!   (KV head, slice of rows) items on candle's pool; the slices' partial
//!   softmaxes are merged exactly (max, sum and output rescaled).
//!
//! Softmax uses a vectorizable `exp` ([`exp_neg`], Cephes' polynomial,
//! ~1 ulp); masked entries become exactly 0.

use super::kv_cache::{KvHead, KvRows};
use super::simd;

/// Query rows per prefill work item.
const ROW_BLOCK: usize = 64;

/// Passes of at most this many query rows (a keystroke's retokenized tail)
/// go row by row through the decode path, which reads the stored rows in
/// place, rather than widening the layer's whole K/V for a small product.
const SMALL_PASS: usize = 8;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (each serves `n_heads / n_kv_heads` query heads).
    pub n_kv_heads: usize,
    /// Floats per head.
    pub head_dim: usize,
}

/// Attention of `n_q` query rows over `n_kv` kept entries.
///
/// - `q`: `n_q × (n_heads·head_dim)`, row-major;
/// - `k`, `v`: per KV head, `n_kv × head_dim` (head-major);
/// - `bias`: `n_q × n_kv` additive mask (0 or −∞); every row allows at least
///   one entry;
/// - `out`: `n_q × (n_heads·head_dim)`.
pub fn attend(h: Heads, q: &[f32], k: KvRows, v: KvRows, bias: &[f32], out: &mut [f32]) {
    let (q_dim, hd) = (h.n_heads * h.head_dim, h.head_dim);
    let n_q = q.len() / q_dim;
    assert!(k.heads() == h.n_kv_heads && v.heads() == h.n_kv_heads);
    let n_kv = k.head(0).len() / hd;
    assert!((0..h.n_kv_heads).all(|i| k.head(i).len() == n_kv * hd && v.head(i).len() == n_kv * hd));
    assert_eq!(bias.len(), n_q * n_kv);
    assert_eq!(out.len(), n_q * q_dim);
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    if n_q <= SMALL_PASS {
        let kernels = kvk::Isa::best(h.head_dim, h.n_heads / h.n_kv_heads);
        let rows = q.chunks_exact(q_dim).zip(bias.chunks_exact(n_kv.max(1))).zip(out.chunks_exact_mut(q_dim));
        for ((q, bias), out) in rows {
            attend_one(h, q, k, v, bias, out, scale, kernels);
        }
        return;
    }
    let group = h.n_heads / h.n_kv_heads;
    // Widened once per call, a buffer per KV head.
    let k: Vec<_> = (0..h.n_kv_heads).map(|i| k.head(i).to_f32()).collect();
    let v: Vec<_> = (0..h.n_kv_heads).map(|i| v.head(i).to_f32()).collect();
    let blocks = n_q.div_ceil(ROW_BLOCK);
    // Per block of query rows, the runs of columns any of its rows may see.
    let runs: Vec<Vec<(usize, usize)>> =
        (0..blocks).map(|blk| visible_runs(bias, n_kv, blk * ROW_BLOCK, ((blk + 1) * ROW_BLOCK).min(n_q))).collect();
    let out_ptr = out.as_mut_ptr() as usize;
    // On candle's pool, as the matmuls and decode are: a second pool's threads
    // would compete with its workers, which spin a while after each matmul.
    candle_core::utils::barrier_pool().execute_chunked(h.n_heads * blocks, |items| {
        let (mut scores, mut row_bias) = (Vec::new(), Vec::new());
        for item in items {
            let (head, blk) = (item / blocks, item % blocks);
            let kvh = head / group;
            let (r0, r1) = (blk * ROW_BLOCK, ((blk + 1) * ROW_BLOCK).min(n_q));
            let rows = r1 - r0;
            let runs = &runs[blk];
            // The scores of the runs' columns, packed side by side.
            let width: usize = runs.iter().map(|(a, b)| b - a).sum();
            scores.clear();
            scores.resize(rows * width, 0.0);
            let mut at = 0;
            for &(c0, c1) in runs {
                // SAFETY: all pointers and strides stay inside the slices checked
                // above: q rows are q_dim apart with head offsets < q_dim, a KV
                // head's rows hd apart, rows r0..r1 < n_q, columns c0..c1 ≤ n_kv
                // and at + (c1 − c0) ≤ width.
                unsafe {
                    gemm::gemm(
                        rows,
                        c1 - c0,
                        h.head_dim,
                        scores.as_mut_ptr().add(at),
                        1,
                        width as isize,
                        false,
                        q.as_ptr().add(r0 * q_dim + head * h.head_dim),
                        1,
                        q_dim as isize,
                        k[kvh].as_ptr().add(c0 * hd),
                        hd as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                at += c1 - c0;
            }
            simd::run(
                #[inline(always)]
                || {
                    for (r, row) in (r0..r1).zip(scores.chunks_mut(width)) {
                        let full = &bias[r * n_kv..(r + 1) * n_kv];
                        // One run (a causal block, the usual case) needs no packed copy.
                        let packed: &[f32] = match runs[..] {
                            [(c0, c1)] => &full[c0..c1],
                            _ => {
                                row_bias.clear();
                                runs.iter().for_each(|&(c0, c1)| row_bias.extend_from_slice(&full[c0..c1]));
                                &row_bias
                            }
                        };
                        softmax_masked(row, packed);
                    }
                },
            );
            let mut at = 0;
            for (i, &(c0, c1)) in runs.iter().enumerate() {
                // SAFETY: as above; each item writes only rows r0..r1 of its own
                // head's `head_dim` columns of `out` (row stride q_dim), so items
                // never overlap; the first run sets them, the others add to them.
                unsafe {
                    gemm::gemm(
                        rows,
                        h.head_dim,
                        c1 - c0,
                        (out_ptr as *mut f32).add(r0 * q_dim + head * h.head_dim),
                        1,
                        q_dim as isize,
                        i > 0,
                        scores.as_ptr().add(at),
                        1,
                        width as isize,
                        v[kvh].as_ptr().add(c0 * hd),
                        1,
                        hd as isize,
                        if i > 0 { 1.0 } else { 0.0 },
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                at += c1 - c0;
            }
        }
    });
}

/// Columns a gap must span to be skipped (shorter ones cost less to multiply
/// than a separate product).
const MIN_GAP: usize = 32;
/// Runs per block at most: past that, one run from the first visible column.
const MAX_RUNS: usize = 4;

/// The runs `[c0, c1)` of columns that some row of `r0..r1` may see (bias
/// not −∞), in order; gaps under [`MIN_GAP`] columns are kept inside a run.
/// A window cache's evicted rows wait masked until compaction and the rows a
/// block cannot see yet lie past its end: neither is multiplied. Never empty
/// (every row sees something).
fn visible_runs(bias: &[f32], n_kv: usize, r0: usize, r1: usize) -> Vec<(usize, usize)> {
    let mut seen = vec![false; n_kv];
    for r in r0..r1 {
        for (s, &b) in seen.iter_mut().zip(&bias[r * n_kv..(r + 1) * n_kv]) {
            *s |= b != f32::NEG_INFINITY;
        }
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut c = 0;
    while c < n_kv {
        if !seen[c] {
            c += 1;
            continue;
        }
        let start = c;
        while c < n_kv && seen[c] {
            c += 1;
        }
        match runs.last_mut() {
            Some(last) if start - last.1 < MIN_GAP => last.1 = c,
            _ => runs.push((start, c)),
        }
    }
    if runs.len() > MAX_RUNS {
        runs = vec![(runs[0].0, runs[runs.len() - 1].1)];
    }
    if runs.is_empty() {
        runs.push((0, 1));
    }
    runs
}

/// [`attend`] for a single query row: (KV head, slice of rows) items over
/// candle's worker pool (the one the matmuls use, so the two never fight for
/// cores); each K/V row is widened once for the `group` query heads sharing it.
/// f16 and q8 rows go through the `kernels` ([`kvk::Isa::best`]) where given.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    h: Heads,
    q: &[f32],
    k: KvRows,
    v: KvRows,
    bias: &[f32],
    out: &mut [f32],
    scale: f32,
    kernels: Option<kvk::Isa>,
) {
    let hd = h.head_dim;
    let group = h.n_heads / h.n_kv_heads;
    let n_kv = bias.len();
    assert_eq!(out.len(), h.n_heads * hd);
    assert!(k.heads() == h.n_kv_heads && v.heads() == h.n_kv_heads);
    // Slices of at least 128 rows, at most 16 of them per KV head.
    let slice_rows = 128.max(n_kv.div_ceil(16));
    let n_slices = n_kv.div_ceil(slice_rows).max(1);
    let n_items = h.n_kv_heads * n_slices;
    // Per item and head of its group: max, sum, then `hd` unnormalized outputs.
    let stride = group * (hd + 2);
    let mut part = vec![0f32; n_items * stride];
    let part_ptr = part.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n_items, |items| {
        let mut s = vec![0f32; group * slice_rows];
        let mut buf = vec![0f32; hd];
        // Compiled for the CPU's best vector set: max, exp and sums below.
        simd::run(
            #[inline(always)]
            || {
                for item in items {
                    let (kvh, sl) = (item / n_slices, item % n_slices);
                    let (a, b) = (sl * slice_rows, ((sl + 1) * slice_rows).min(n_kv));
                    let m = b - a;
                    let qs = &q[kvh * group * hd..(kvh + 1) * group * hd];
                    let rows = kvk::Rows { a, b, hd, stride: slice_rows };
                    let (kh, vh) = (k.head(kvh), v.head(kvh));
                    // f16 and q8 rows: SIMD kernels widen each run of values in registers.
                    let fast = match (kh, vh, kernels) {
                        (KvHead::F16(k), KvHead::F16(v), Some(isa)) => {
                            Some((isa, kvk::Stored::f16(k), kvk::Stored::f16(v)))
                        }
                        (KvHead::Q8(k, _), KvHead::Q8(v, _), Some(isa)) => {
                            Some((isa, kvk::Stored::q8(k), kvk::Stored::q8(v)))
                        }
                        _ => None,
                    };
                    if let Some((isa, ks, _)) = fast {
                        // SAFETY: `Isa::best` (or the test) checked the CPU has `isa`;
                        // the kernel checks its bounds.
                        unsafe { kvk::scores(isa, group, ks, rows, qs, scale, bias, &mut s) };
                    } else {
                        for (i, &bias_r) in bias[a..b].iter().enumerate() {
                            if bias_r == f32::NEG_INFINITY {
                                (0..group).for_each(|g| s[g * slice_rows + i] = f32::NEG_INFINITY);
                                continue;
                            }
                            let kr = kh.row((a + i) * hd, &mut buf);
                            for (g, qh) in qs.chunks_exact(hd).enumerate() {
                                s[g * slice_rows + i] = dot(qh, kr) * scale + bias_r;
                            }
                        }
                    }
                    // SAFETY: item `item` owns `part[item·stride..(item+1)·stride]`;
                    // `part` outlives the pool call and items never repeat.
                    let p =
                        unsafe { std::slice::from_raw_parts_mut((part_ptr as *mut f32).add(item * stride), stride) };
                    let mut any = false;
                    for g in 0..group {
                        let sg = &mut s[g * slice_rows..g * slice_rows + m];
                        let mx = max_of(sg);
                        let sum = if mx == f32::NEG_INFINITY { 0.0 } else { exp_sum(sg, mx) };
                        any |= sum > 0.0;
                        let pg = &mut p[g * (hd + 2)..(g + 1) * (hd + 2)];
                        pg[0] = mx;
                        pg[1] = sum;
                        pg[2..].fill(0.0);
                    }
                    if !any {
                        continue;
                    }
                    if let Some((isa, _, vs)) = fast {
                        // SAFETY: as for the scores.
                        unsafe { kvk::values(isa, group, vs, rows, &s, p) };
                        continue;
                    }
                    for i in 0..m {
                        if (0..group).all(|g| s[g * slice_rows + i] == 0.0) {
                            continue;
                        }
                        let vr = vh.row((a + i) * hd, &mut buf);
                        for g in 0..group {
                            let w = s[g * slice_rows + i];
                            if w != 0.0 {
                                let o = &mut p[g * (hd + 2) + 2..(g + 1) * (hd + 2)];
                                o.iter_mut().zip(vr).for_each(|(o, x)| *o += w * x);
                            }
                        }
                    }
                }
            },
        );
    });
    // Merge the slices of each head: rescale each to the common max.
    for head in 0..h.n_heads {
        let (kvh, g) = (head / group, head % group);
        let at = |sl: usize| (kvh * n_slices + sl) * stride + g * (hd + 2);
        let mx = (0..n_slices).map(|sl| part[at(sl)]).fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[head * hd..(head + 1) * hd];
        o.fill(0.0);
        let mut sum = 0f32;
        for sl in 0..n_slices {
            let pg = &part[at(sl)..at(sl) + hd + 2];
            if pg[1] == 0.0 {
                continue;
            }
            let w = exp_neg(pg[0] - mx);
            sum += w * pg[1];
            o.iter_mut().zip(&pg[2..]).for_each(|(o, x)| *o += w * x);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Decode kernels for stored K/V rows, `f16` or `q8`, that widen each run of
/// values in registers (a round trip through a buffer stalls on store
/// forwarding): AVX-512F (`vcvtph2ps`, or `vpmovsxbd` and `vcvtdq2ps`, to 16
/// floats) or AVX2 with F16C (8 floats), for groups of 1–8 query heads per KV
/// head. A `q8` row's scale multiplies its score (K) or its weight (V) once.
mod kvk {
    use half::f16;

    use crate::engine::kv_cache::Q8_SCALE_BYTES;

    /// A KV head's stored rows as the kernels read them: their bytes, `f16`
    /// values or `q8` rows ([`Q8_SCALE_BYTES`] of scale, then a byte a value).
    #[derive(Clone, Copy)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub struct Stored<'a> {
        bytes: &'a [u8],
        q8: bool,
    }

    impl<'a> Stored<'a> {
        pub fn f16(v: &'a [f16]) -> Self {
            // SAFETY: an f16 is two plain bytes; the view covers `v` exactly.
            Stored { bytes: unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) }, q8: false }
        }

        pub fn q8(v: &'a [i8]) -> Self {
            // SAFETY: as above, a byte each.
            Stored { bytes: unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) }, q8: true }
        }
    }

    /// Bytes a row of `hd` values takes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const fn row_bytes<const Q8: bool>(hd: usize) -> usize {
        if Q8 {
            hd + Q8_SCALE_BYTES
        } else {
            2 * hd
        }
    }

    /// The scale of the `q8` row at `row` (the caller skips it for `f16`).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row_scale(row: *const u8) -> f32 {
        crate::engine::kv_cache::q8_scale(std::slice::from_raw_parts(row as *const i8, Q8_SCALE_BYTES))
    }

    /// Values `16·c..16·c + 16` of the row at `row`, as floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const Q8: bool>(row: *const u8, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        if Q8 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128(row.add(Q8_SCALE_BYTES + 16 * c) as *const __m128i),
            ))
        } else {
            _mm512_cvtph_ps(_mm256_loadu_si256(row.add(32 * c) as *const __m256i))
        }
    }

    /// Values `8·c..8·c + 8` of the row at `row`, as floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const Q8: bool>(row: *const u8, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        if Q8 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(row.add(Q8_SCALE_BYTES + 8 * c) as *const __m128i)))
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(row.add(16 * c) as *const __m128i))
        }
    }

    /// Rows `a..b` of a KV head's buffer (rows `hd` wide, one after another);
    /// the score rows of the group's heads are `stride` apart.
    #[derive(Clone, Copy)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub struct Rows {
        pub a: usize,
        pub b: usize,
        pub hd: usize,
        pub stride: usize,
    }

    /// An instruction set the kernels are written for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Isa {
        Avx512,
        Avx2,
    }

    impl Isa {
        /// Floats a register holds (`hd` must be a multiple).
        pub fn lanes(self) -> usize {
            match self {
                Isa::Avx512 => 16,
                Isa::Avx2 => 8,
            }
        }

        /// Whether this CPU runs the kernels of `self`.
        pub fn available(self) -> bool {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                match self {
                    Isa::Avx512 => has!("avx512f"),
                    Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = self;
                false
            }
        }

        /// The widest set this CPU runs for heads of `hd` floats and `group`
        /// query heads per KV head, if any, under the `ANCHORCODER_KERNEL`
        /// cap (`avx2`: not AVX-512; `scalar`: none).
        pub fn best(hd: usize, group: usize) -> Option<Isa> {
            Isa::best_under(hd, group, crate::engine::quant::Kernel::cap())
        }

        /// [`Isa::best`] under the cap `cap`.
        pub(super) fn best_under(hd: usize, group: usize, cap: crate::engine::quant::Kernel) -> Option<Isa> {
            if !(1..=8).contains(&group) {
                return None;
            }
            [Isa::Avx512, Isa::Avx2]
                .into_iter()
                .find(|i| hd.is_multiple_of(i.lanes()) && i.available() && cap >= i.quant_peer())
        }

        /// The quantized kernel of the same vector width (what a cap names).
        fn quant_peer(self) -> crate::engine::quant::Kernel {
            use crate::engine::quant::Kernel;
            match self {
                Isa::Avx512 => Kernel::Avx512Vnni,
                Isa::Avx2 => Kernel::Avx2,
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    macro_rules! by_group {
        ($group:expr, $f:ident < $q8:tt > ( $($arg:expr),* )) => {
            match $group {
                1 => $f::<1, $q8>($($arg),*),
                2 => $f::<2, $q8>($($arg),*),
                3 => $f::<3, $q8>($($arg),*),
                4 => $f::<4, $q8>($($arg),*),
                5 => $f::<5, $q8>($($arg),*),
                6 => $f::<6, $q8>($($arg),*),
                7 => $f::<7, $q8>($($arg),*),
                8 => $f::<8, $q8>($($arg),*),
                g => unreachable!("group {g} has no kernel"),
            }
        };
    }

    /// The bounds both kernels need: `kv` holds rows `a..b` of `hd` values,
    /// and `s` the group's score rows for them.
    #[cfg(target_arch = "x86_64")]
    fn check_rows(lanes: usize, group: usize, kv: Stored, r: Rows, s: &[f32]) {
        let width = if kv.q8 { row_bytes::<true>(r.hd) } else { row_bytes::<false>(r.hd) };
        assert!((1..=8).contains(&group) && r.a <= r.b);
        assert!(r.hd.is_multiple_of(lanes) && r.b * width <= kv.bytes.len());
        assert!(s.len() >= (group - 1) * r.stride + (r.b - r.a));
    }

    /// `s[g·stride + i] = q_g · k_(a+i) · scale + bias[a+i]` for the group's
    /// heads `q_g` (`qs`, `hd` apart); masked rows get −∞ (AVX2 reads a few
    /// rows together, so a masked row is read unless its whole group is).
    ///
    /// # Safety
    /// `isa` must be available ([`Isa::available`]); the kernels check their
    /// bounds and `hd`.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores(
        isa: Isa,
        group: usize,
        k: Stored,
        r: Rows,
        qs: &[f32],
        scale: f32,
        bias: &[f32],
        s: &mut [f32],
    ) {
        check_rows(isa.lanes(), group, k, r, s);
        assert!(qs.len() >= group * r.hd && r.b <= bias.len());
        let kb = k.bytes;
        match (isa, k.q8) {
            (Isa::Avx512, false) => by_group!(group, scores_512<false>(kb, r, qs, scale, bias, s)),
            (Isa::Avx512, true) => by_group!(group, scores_512<true>(kb, r, qs, scale, bias, s)),
            (Isa::Avx2, false) => by_group!(group, scores_256<false>(kb, r, qs, scale, bias, s)),
            (Isa::Avx2, true) => by_group!(group, scores_256<true>(kb, r, qs, scale, bias, s)),
        }
    }

    /// `o_g += s[g·stride + i] · v_(a+i)` over the rows, where `o_g` is
    /// `p[g·(hd+2) + 2..][..hd]`; rows all heads gave weight 0 are not read.
    ///
    /// # Safety
    /// As [`scores`].
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn values(isa: Isa, group: usize, v: Stored, r: Rows, s: &[f32], p: &mut [f32]) {
        check_rows(isa.lanes(), group, v, r, s);
        assert!(p.len() >= group * (r.hd + 2));
        let vb = v.bytes;
        match (isa, v.q8) {
            (Isa::Avx512, false) => by_group!(group, values_512<false>(vb, r, s, p)),
            (Isa::Avx512, true) => by_group!(group, values_512<true>(vb, r, s, p)),
            (Isa::Avx2, false) => by_group!(group, values_256<false>(vb, r, s, p)),
            (Isa::Avx2, true) => by_group!(group, values_256<true>(vb, r, s, p)),
        }
    }

    // SAFETY (all the kernels below): the caller checked the bounds above, so
    // every load and store stays inside `k`/`v`, `qs`, `s` and `p`.

    /// Four rows at a time where their `4·G` sums fit in registers (`G` ≤ 4),
    /// so that four sums are reduced together ([`sum4_512`]); the rest one
    /// row at a time. Masked rows get −∞ (read with the others unless all
    /// four are masked).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_512<const G: usize, const Q8: bool>(
        k: &[u8],
        r: Rows,
        qs: &[f32],
        scale: f32,
        bias: &[f32],
        s: &mut [f32],
    ) {
        let mut row = r.a;
        if G <= 4 {
            while row + 4 <= r.b {
                row = scores_rows_512::<G, 4, Q8>(k, r, qs, scale, bias, s, row);
            }
        }
        while row < r.b {
            row = scores_rows_512::<G, 1, Q8>(k, r, qs, scale, bias, s, row);
        }
    }

    /// [`scores_512`] for rows `row..row + R` (`R` is 1 or 4); returns `row + R`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_rows_512<const G: usize, const R: usize, const Q8: bool>(
        k: &[u8],
        r: Rows,
        qs: &[f32],
        scale: f32,
        bias: &[f32],
        s: &mut [f32],
        row: usize,
    ) -> usize {
        use std::arch::x86_64::*;
        assert!(row >= r.a && row + R <= r.b && (R == 1 || R == 4));
        // Evicted rows wait for compaction masked, in runs: not read.
        if bias[row..row + R].iter().all(|&b| b == f32::NEG_INFINITY) {
            for g in 0..G {
                s[g * r.stride + row - r.a..][..R].fill(f32::NEG_INFINITY);
            }
            return row + R;
        }
        let kp: [*const u8; R] = std::array::from_fn(|j| k.as_ptr().add((row + j) * row_bytes::<Q8>(r.hd)));
        let mut acc = [[_mm512_setzero_ps(); R]; G];
        for c in 0..r.hd / 16 {
            let x: [__m512; R] = std::array::from_fn(|j| load16::<Q8>(kp[j], c));
            for (g, acc) in acc.iter_mut().enumerate() {
                let q = _mm512_loadu_ps(qs.as_ptr().add(g * r.hd + c * 16));
                for (acc, x) in acc.iter_mut().zip(&x) {
                    *acc = _mm512_fmadd_ps(q, *x, *acc);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            let sums: [f32; R] = if R == 4 {
                let mut four = [0f32; 4];
                _mm_storeu_ps(four.as_mut_ptr(), sum4_512(std::array::from_fn(|j| acc[j % R])));
                std::array::from_fn(|j| four[j])
            } else {
                std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]))
            };
            for (j, sum) in sums.into_iter().enumerate() {
                let (b, i) = (bias[row + j], row + j - r.a);
                let sum = if Q8 { sum * row_scale(kp[j]) } else { sum };
                s[g * r.stride + i] = if b == f32::NEG_INFINITY { f32::NEG_INFINITY } else { sum * scale + b };
            }
        }
        row + R
    }

    /// The sums of four registers' 16 floats each, as the four lanes of one
    /// (about a third of the shuffles and adds of four separate reductions).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum4_512(a: [std::arch::x86_64::__m512; 4]) -> std::arch::x86_64::__m128 {
        use std::arch::x86_64::*;
        // Per 128-bit lane `[x0 x1 x2 x3]` of each register:
        // t0 = [a02 b02 a13 b13] (a = a[0], b = a[1], a02 = x0 + x2 of a), t1 likewise
        // for a[2], a[3]; pairs of them then give [a, b, c, d] partial sums.
        let t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
        let t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
        let (t0, t1) = (_mm512_castps_pd(t0), _mm512_castps_pd(t1));
        let u =
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(t0, t1)), _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t1)));
        // Then the four 128-bit lanes are added.
        let h = _mm256_add_ps(
            _mm512_castps512_ps256(u),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(u))),
        );
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// Like [`values_256`]: the output is summed in passes of `N` runs of 16
    /// columns (`N·G` sums of at most 24 of AVX-512's 32 registers) kept in
    /// registers over all the rows and added to `p` once. Adding each row's
    /// share to `p` in memory instead chains every row's loads and stores
    /// (and `p`'s sums start 8 bytes into a line, so each store splits two).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn values_512<const G: usize, const Q8: bool>(v: &[u8], r: Rows, s: &[f32], p: &mut [f32]) {
        let runs = r.hd / 16;
        // Runs per pass: the most of 8, 4, 2 whose sums fit, then one at a time.
        let n = [8, 4, 2].into_iter().find(|&n| n <= runs && G * n <= 24).unwrap_or(1);
        let mut c0 = 0;
        while c0 + n <= runs && n > 1 {
            c0 = match n {
                8 => values_pass_512::<G, 8, Q8>(v, r, s, p, c0),
                4 => values_pass_512::<G, 4, Q8>(v, r, s, p, c0),
                _ => values_pass_512::<G, 2, Q8>(v, r, s, p, c0),
            };
        }
        while c0 < runs {
            c0 = values_pass_512::<G, 1, Q8>(v, r, s, p, c0);
        }
    }

    /// One pass of [`values_512`]: runs `c0..c0 + N`; returns `c0 + N`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // [head][run] indices read as the layout
    unsafe fn values_pass_512<const G: usize, const N: usize, const Q8: bool>(
        v: &[u8],
        r: Rows,
        s: &[f32],
        p: &mut [f32],
        c0: usize,
    ) -> usize {
        use std::arch::x86_64::*;
        assert!((c0 + N) * 16 <= r.hd);
        let mut acc = [[_mm512_setzero_ps(); N]; G];
        for (i, row) in (r.a..r.b).enumerate() {
            let mut w: [f32; G] = std::array::from_fn(|g| s[g * r.stride + i]);
            if w.iter().all(|&w| w == 0.0) {
                continue;
            }
            let vp = v.as_ptr().add(row * row_bytes::<Q8>(r.hd));
            if Q8 {
                let scale = row_scale(vp);
                w.iter_mut().for_each(|w| *w *= scale);
            }
            for c in 0..N {
                let x = load16::<Q8>(vp, c0 + c);
                for g in 0..G {
                    acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[g]), x, acc[g][c]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                let o = p.as_mut_ptr().add(g * (r.hd + 2) + 2 + (c0 + c) * 16);
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *acc));
            }
        }
        c0 + N
    }

    /// Sum of a register's 8 floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_256(x: std::arch::x86_64::__m256) -> f32 {
        use std::arch::x86_64::*;
        let q = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
    }

    /// Rows at a time, scored by [`scores_rows_256`] (`R·G` sums, `R` rows
    /// widened and one query run: at most 15 of AVX2's 16 registers), so that
    /// each run of a query head is loaded once for `R` rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_256<const G: usize, const Q8: bool>(
        k: &[u8],
        r: Rows,
        qs: &[f32],
        scale: f32,
        bias: &[f32],
        s: &mut [f32],
    ) {
        let at_once = match G {
            1 | 2 => 4,
            3 => 3,
            4..=6 => 2,
            _ => 1,
        };
        let mut row = r.a;
        while row + at_once <= r.b && at_once > 1 {
            row = match at_once {
                4 => scores_rows_256::<G, 4, Q8>(k, r, qs, scale, bias, s, row),
                3 => scores_rows_256::<G, 3, Q8>(k, r, qs, scale, bias, s, row),
                _ => scores_rows_256::<G, 2, Q8>(k, r, qs, scale, bias, s, row),
            };
        }
        while row < r.b {
            row = scores_rows_256::<G, 1, Q8>(k, r, qs, scale, bias, s, row);
        }
    }

    /// [`scores_256`] for rows `row..row + R`; returns `row + R`. Masked rows
    /// get −∞ (read with the others unless all `R` are masked).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_rows_256<const G: usize, const R: usize, const Q8: bool>(
        k: &[u8],
        r: Rows,
        qs: &[f32],
        scale: f32,
        bias: &[f32],
        s: &mut [f32],
        row: usize,
    ) -> usize {
        use std::arch::x86_64::*;
        assert!(row >= r.a && row + R <= r.b);
        // Evicted rows wait for compaction masked, in runs: not read.
        if bias[row..row + R].iter().all(|&b| b == f32::NEG_INFINITY) {
            for g in 0..G {
                s[g * r.stride + row - r.a..][..R].fill(f32::NEG_INFINITY);
            }
            return row + R;
        }
        let kp: [*const u8; R] = std::array::from_fn(|j| k.as_ptr().add((row + j) * row_bytes::<Q8>(r.hd)));
        let mut acc = [[_mm256_setzero_ps(); R]; G];
        for c in 0..r.hd / 8 {
            let x: [__m256; R] = std::array::from_fn(|j| load8::<Q8>(kp[j], c));
            for (g, acc) in acc.iter_mut().enumerate() {
                let q = _mm256_loadu_ps(qs.as_ptr().add(g * r.hd + c * 8));
                for (acc, x) in acc.iter_mut().zip(&x) {
                    *acc = _mm256_fmadd_ps(q, *x, *acc);
                }
            }
        }
        for (j, row) in (row..row + R).enumerate() {
            let (b, i) = (bias[row], row - r.a);
            let row_scale = if Q8 { row_scale(kp[j]) * scale } else { scale };
            for (g, acc) in acc.iter().enumerate() {
                s[g * r.stride + i] =
                    if b == f32::NEG_INFINITY { f32::NEG_INFINITY } else { sum_256(acc[j]) * row_scale + b };
            }
        }
        row + R
    }

    /// AVX2 has half AVX-512's registers, so the output is summed in passes
    /// of `N` runs of 8 columns (`N·G` sums of at most 12 registers of the
    /// 16): each pass keeps its sums in registers over all the rows and adds
    /// them to `p` once (a load and a store of every sum per row would cost
    /// more than the arithmetic).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values_256<const G: usize, const Q8: bool>(v: &[u8], r: Rows, s: &[f32], p: &mut [f32]) {
        let runs = r.hd / 8;
        // Runs per pass (a multiple of them first, then one at a time).
        let n = match G {
            1 => 8,
            2 => 6,
            3 => 4,
            4 => 3,
            5 | 6 => 2,
            _ => 1,
        };
        let mut c0 = 0;
        while c0 + n <= runs && n > 1 {
            c0 = match n {
                8 => values_pass_256::<G, 8, Q8>(v, r, s, p, c0),
                6 => values_pass_256::<G, 6, Q8>(v, r, s, p, c0),
                4 => values_pass_256::<G, 4, Q8>(v, r, s, p, c0),
                3 => values_pass_256::<G, 3, Q8>(v, r, s, p, c0),
                _ => values_pass_256::<G, 2, Q8>(v, r, s, p, c0),
            };
        }
        while c0 < runs {
            c0 = values_pass_256::<G, 1, Q8>(v, r, s, p, c0);
        }
    }

    /// One pass of [`values_256`]: runs `c0..c0 + N`; returns `c0 + N`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // [head][run] indices read as the layout
    unsafe fn values_pass_256<const G: usize, const N: usize, const Q8: bool>(
        v: &[u8],
        r: Rows,
        s: &[f32],
        p: &mut [f32],
        c0: usize,
    ) -> usize {
        use std::arch::x86_64::*;
        assert!((c0 + N) * 8 <= r.hd);
        let mut acc = [[_mm256_setzero_ps(); N]; G];
        for (i, row) in (r.a..r.b).enumerate() {
            let mut w: [f32; G] = std::array::from_fn(|g| s[g * r.stride + i]);
            if w.iter().all(|&w| w == 0.0) {
                continue;
            }
            let vp = v.as_ptr().add(row * row_bytes::<Q8>(r.hd));
            if Q8 {
                let scale = row_scale(vp);
                w.iter_mut().for_each(|w| *w *= scale);
            }
            for c in 0..N {
                let x = load8::<Q8>(vp, c0 + c);
                for g in 0..G {
                    acc[g][c] = _mm256_fmadd_ps(_mm256_set1_ps(w[g]), x, acc[g][c]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                let o = p.as_mut_ptr().add(g * (r.hd + 2) + 2 + (c0 + c) * 8);
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *acc));
            }
        }
        c0 + N
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores(_: Isa, _: usize, _: Stored, _: Rows, _: &[f32], _: f32, _: &[f32], _: &mut [f32]) {
        unreachable!("no x86 kernels here")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn values(_: Isa, _: usize, _: Stored, _: Rows, _: &[f32], _: &mut [f32]) {
        unreachable!("no x86 kernels here")
    }
}

/// Dot product with independent accumulators, so the compiler vectorizes it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for `x ≤ 0` (a score minus its row's maximum): Cephes' `expf`
/// range reduction and polynomial (relative error ~1e-7), branch-free so
/// that loops over it vectorize. −∞ (a masked entry) and anything below
/// −87 (where `e^x` is no longer a normal float) give exactly 0.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 0.0);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    // 2^n from bits: adding 1.5·2^23 leaves the integer n + 127 (1..=127
    // here) in the low bits of the mantissa. A float-to-int cast would not
    // vectorize as well (Rust's saturating `as`).
    let biased = (n + (127.0 + 12_582_912.0)).to_bits().wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(biased << 23);
    if x >= -87.0 {
        e * scale
    } else {
        0.0
    }
}

/// Largest value (−∞ for an empty or all −∞ slice), lane-wise so it vectorizes.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let c = x.chunks_exact(16);
    let tail = c.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for ch in c {
        for i in 0..16 {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Replace each `x` by `e^(x − max)` and return their sum.
#[inline(always)]
fn exp_sum(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut c = x.chunks_exact_mut(16);
    for ch in &mut c {
        for i in 0..16 {
            ch[i] = exp_neg(ch[i] - max);
            acc[i] += ch[i];
        }
    }
    // The last few values through one padded register's worth, not one by one.
    let rest = c.into_remainder();
    let mut pad = [f32::NEG_INFINITY; 16];
    pad[..rest.len()].copy_from_slice(rest);
    for (p, a) in pad.iter_mut().zip(&mut acc) {
        *p = exp_neg(*p - max);
        *a += *p;
    }
    rest.copy_from_slice(&pad[..rest.len()]);
    acc.iter().sum::<f32>()
}

/// In-place softmax of `row + bias`; masked entries become exactly 0.
#[inline(always)]
fn softmax_masked(row: &mut [f32], bias: &[f32]) {
    row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
    let max = max_of(row);
    let inv = 1.0 / exp_sum(row, max);
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: loops, no gemm.
    fn naive(h: Heads, q: &[f32], k: &[f32], v: &[f32], bias: &[f32]) -> Vec<f32> {
        let (qd, kd, hd) = (h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim, h.head_dim);
        let (n_q, n_kv) = (q.len() / qd, k.len() / kd);
        let mut out = vec![0f32; n_q * qd];
        for i in 0..n_q {
            for head in 0..h.n_heads {
                let kvh = head / (h.n_heads / h.n_kv_heads);
                let s: Vec<f32> = (0..n_kv)
                    .map(|j| {
                        let dot: f32 = (0..hd).map(|d| q[i * qd + head * hd + d] * k[j * kd + kvh * hd + d]).sum();
                        dot / (hd as f32).sqrt() + bias[i * n_kv + j]
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    out[i * qd + head * hd + d] = (0..n_kv).map(|j| e[j] / z * v[j * kd + kvh * hd + d]).sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_gqa_and_mask() {
        // Several query rows (the gemm path, one and several row blocks, with
        // and without a causal tail) and one (the decode path, one and several
        // slices of rows, some slices fully masked).
        for (n_q, n_kv, head_dim, causal) in [
            (5, 11, 8, false),
            (70, 90, 8, true),
            (3, 40, 16, true),
            // Small passes, row by row through the decode path, and one row past them.
            (3, 700, 16, true),
            (SMALL_PASS, 90, 8, true),
            (SMALL_PASS + 1, 90, 8, true),
            (1, 11, 8, false),
            (1, 37, 24, false),
            (1, 700, 8, false),
            // head_dim a multiple of 16 (8): the AVX-512 (AVX2) f16 decode kernels where available.
            (1, 700, 16, false),
            (1, 45, 32, false),
        ] {
            check(n_q, n_kv, head_dim, causal);
        }
    }

    /// Row-major K or V rows (`n_kv_heads · head_dim` a row) as the cache
    /// keeps them: a buffer per KV head.
    fn head_major<T: Copy>(x: &[T], h: Heads) -> Vec<Vec<T>> {
        let kv_dim = h.n_kv_heads * h.head_dim;
        (0..h.n_kv_heads)
            .map(|i| {
                x.chunks_exact(kv_dim).flat_map(|row| &row[i * h.head_dim..(i + 1) * h.head_dim]).copied().collect()
            })
            .collect()
    }

    fn inputs(n_q: usize, n_kv: usize, head_dim: usize, causal: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (qd, kd) = (6 * head_dim, 2 * head_dim);
        let f = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let q: Vec<f32> = (0..n_q * qd).map(|i| 3.0 * f(i)).collect();
        let k: Vec<f32> = (0..n_kv * kd).map(|i| f(i + 3)).collect();
        let v: Vec<f32> = (0..n_kv * kd).map(|i| f(i + 11)).collect();
        let bias: Vec<f32> = (0..n_q * n_kv)
            .map(|i| {
                let (r, c) = (i / n_kv, i % n_kv);
                let hidden = if causal { c > n_kv - n_q + r } else { (i * 31) % 7 == 3 && c != 0 };
                // The decode case also hides a whole run (a masked slice).
                if hidden || (n_q == 1 && (150..300).contains(&c)) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        (q, k, v, bias)
    }

    fn check(n_q: usize, n_kv: usize, head_dim: usize, causal: bool) {
        let h = Heads { n_heads: 6, n_kv_heads: 2, head_dim };
        let (q, k, v, bias) = inputs(n_q, n_kv, head_dim, causal);
        let mut out = vec![f32::NAN; n_q * 6 * head_dim];
        let kv = |x: &[f32]| head_major(x, h);
        attend(h, &q, KvRows::F32(&kv(&k)), KvRows::F32(&kv(&v)), &bias, &mut out);
        let want = naive(h, &q, &k, &v, &bias);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{n_q}x{n_kv}: {a} vs {b}");
        }
        // Stored as f16: exactly the f32 result on the rounded rows (to float
        // rounding), and within the rounding's reach of the f32 reference.
        let (k16, v16): (Vec<half::f16>, Vec<half::f16>) =
            (k.iter().map(|&x| half::f16::from_f32(x)).collect(), v.iter().map(|&x| half::f16::from_f32(x)).collect());
        let widen = |x: &[half::f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
        attend(h, &q, KvRows::F16(&head_major(&k16, h)), KvRows::F16(&head_major(&v16, h)), &bias, &mut out);
        let rounded = naive(h, &q, &widen(&k16), &widen(&v16), &bias);
        for ((a, b), c) in out.iter().zip(&rounded).zip(&want) {
            assert!((a - b).abs() < 1e-5, "{n_q}x{n_kv} f16: {a} vs {b}");
            assert!((a - c).abs() < 5e-3, "{n_q}x{n_kv} f16 vs f32: {a} vs {c}");
        }
    }

    #[test]
    fn prefill_skips_the_columns_no_row_of_a_block_sees() {
        // A window-like mask: 3 sinks, then each row sees the 40 positions up
        // to itself, so later blocks leave a long run of columns out.
        let (h, n_q, n_kv) = (Heads { n_heads: 6, n_kv_heads: 2, head_dim: 8 }, 150, 300);
        let (q, k, v, _) = inputs(n_q, n_kv, 8, true);
        let first = n_kv - n_q;
        let bias: Vec<f32> = (0..n_q * n_kv)
            .map(|i| {
                let (r, c) = (i / n_kv, i % n_kv);
                let pos = first + r;
                if c < 3 || (c <= pos && c + 40 > pos) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        assert_eq!(visible_runs(&bias, n_kv, 64, 128), vec![(0, 3), (first + 64 - 39, first + 128)]);
        let mut out = vec![f32::NAN; n_q * 6 * 8];
        attend(h, &q, KvRows::F32(&head_major(&k, h)), KvRows::F32(&head_major(&v, h)), &bias, &mut out);
        for (a, b) in out.iter().zip(&naive(h, &q, &k, &v, &bias)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Runs closer than MIN_GAP merge; more than MAX_RUNS become one.
        let row = |n: usize, cols: &[usize]| -> Vec<f32> {
            (0..n).map(|c| if cols.contains(&c) { 0.0 } else { f32::NEG_INFINITY }).collect()
        };
        assert_eq!(visible_runs(&row(100, &[0, 1, 10, 50, 99]), 100, 0, 1), vec![(0, 11), (50, 51), (99, 100)]);
        assert_eq!(visible_runs(&row(200, &[0, 40, 80, 120, 160]), 200, 0, 1), vec![(0, 161)]);
    }

    /// `ANCHORCODER_KERNEL` caps the attention kernels as it does the
    /// quantized ones: `avx2` never picks AVX-512, `scalar` picks none.
    #[test]
    fn the_kernel_cap_limits_the_attention_kernels() {
        use crate::engine::quant::Kernel;
        let avail = |i: kvk::Isa| i.available().then_some(i);
        let widest = avail(kvk::Isa::Avx512).or(avail(kvk::Isa::Avx2));
        assert_eq!(kvk::Isa::best_under(64, 3, Kernel::Avx512Vnni), widest);
        assert_eq!(kvk::Isa::best_under(64, 3, Kernel::Avx2), avail(kvk::Isa::Avx2));
        assert_eq!(kvk::Isa::best_under(64, 3, Kernel::Scalar), None);
        assert_eq!(kvk::Isa::best_under(64, 9, Kernel::Avx512Vnni), None, "no kernel for groups past 8");
    }

    /// Row-major rows from head-major ones (the inverse of [`head_major`]).
    fn row_major(heads: &[std::borrow::Cow<[f32]>], hd: usize) -> Vec<f32> {
        let n = heads[0].len() / hd;
        (0..n).flat_map(|r| heads.iter().flat_map(move |h| h[r * hd..(r + 1) * hd].iter().copied())).collect()
    }

    #[test]
    fn every_decode_kernel_matches_the_generic_path() {
        // Each kernel set this CPU runs (AVX-512 and AVX2 on the same machine
        // where it has both), for every group size they serve and for rows
        // stored as f16 and as q8, against the path that widens rows through
        // a buffer; and that path against the naive reference on the stored
        // (rounded) rows.
        use crate::engine::kv_cache::{KvCache, KvPrecision};
        use crate::engine::policy::AttentionPolicy;
        let f = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let mut ran = 0;
        // The last three take the AVX-512 values kernel's other pass widths
        // (8 runs, 4 runs twice, 2 runs then 1).
        for (group, n_kv_heads, hd, n_kv) in [
            (1, 2, 16, 300),
            (3, 3, 64, 1100),
            (4, 1, 8, 90),
            (8, 2, 32, 257),
            (2, 2, 128, 200),
            (6, 1, 128, 150),
            (5, 1, 48, 77),
        ] {
            let h = Heads { n_heads: group * n_kv_heads, n_kv_heads, head_dim: hd };
            let (qd, kd) = (h.n_heads * hd, n_kv_heads * hd);
            let q: Vec<f32> = (0..qd).map(|i| 3.0 * f(i)).collect();
            // Rows of different magnitudes, so that q8's per-row scales differ.
            let k: Vec<f32> = (0..n_kv * kd).map(|i| f(i + 3) * (1.0 + (i / kd % 7) as f32)).collect();
            let v: Vec<f32> = (0..n_kv * kd).map(|i| f(i + 11) * (1.0 + (i / kd % 5) as f32)).collect();
            let bias: Vec<f32> = (0..n_kv)
                .map(|c| if c % 5 == 2 || (140..290).contains(&c) { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            for precision in [KvPrecision::F16, KvPrecision::Q8] {
                let mut cache = KvCache::with_precision(AttentionPolicy::full(), 1, n_kv_heads, hd, precision);
                cache.begin_chunk(&vec![false; n_kv]);
                cache.append(0, &k, &v);
                let layer = cache.layer(0);
                let run = |isa| {
                    let mut out = vec![f32::NAN; qd];
                    attend_one(h, &q, layer.k, layer.v, &bias, &mut out, scale, isa);
                    out
                };
                let generic = run(None);
                let stored =
                    |x: KvRows| row_major(&(0..n_kv_heads).map(|i| x.head(i).to_f32()).collect::<Vec<_>>(), hd);
                let want = naive(h, &q, &stored(layer.k), &stored(layer.v), &bias);
                for (a, b) in generic.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "generic {precision:?} g{group} hd{hd}: {a} vs {b}");
                }
                for isa in [kvk::Isa::Avx512, kvk::Isa::Avx2] {
                    if !isa.available() || !hd.is_multiple_of(isa.lanes()) {
                        continue;
                    }
                    ran += 1;
                    for (a, b) in run(Some(isa)).iter().zip(&generic) {
                        assert!((a - b).abs() < 1e-4, "{isa:?} {precision:?} g{group} hd{hd}: {a} vs {b}");
                    }
                }
            }
        }
        // On x86-64 machines with AVX2 (every one CI runs on), the kernels ran.
        if kvk::Isa::Avx2.available() {
            assert!(ran >= 8, "{ran}");
        }
    }

    #[test]
    fn exp_neg_is_close_to_exp_and_masks_exactly() {
        let mut worst = 0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (exp_neg(x), (x as f64).exp());
            worst = worst.max(((got as f64 - want) / want).abs() as f32);
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn exp_sum_treats_every_length_alike() {
        // Lengths around the 16-lane blocks: the last few values go through
        // a padded block, masked ones give exactly 0.
        for n in 0..50 {
            let x: Vec<f32> =
                (0..n).map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { -((i * 37 % 23) as f32) / 3.0 }).collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut got = x.clone();
            let sum = if n > 0 { exp_sum(&mut got, max) } else { 0.0 };
            let mut want_sum = 0f64;
            for (g, &v) in got.iter().zip(&x) {
                let want = ((v - max) as f64).exp();
                want_sum += want;
                assert!((*g as f64 - want).abs() <= 1e-6 * want.max(1e-30), "{g} vs {want} (n {n})");
                if v == f32::NEG_INFINITY {
                    assert_eq!(*g, 0.0);
                }
            }
            assert!((sum as f64 - want_sum).abs() <= 1e-5 * want_sum.max(1.0), "sum {sum} vs {want_sum} (n {n})");
        }
    }
}
