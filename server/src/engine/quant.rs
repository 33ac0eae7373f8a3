//! Quantized matrix products on the CPU: 4-bit (Q4_0, Q4_1) and 8-bit (Q8_0)
//! weights times activations quantized to 8 bits, as llama.cpp does.
//!
//! Why our own: decode reads every weight once per token, so its speed is the
//! bytes of weights. candle has no SIMD path for Q4_1 (the default model's
//! format) and its Q8_0 one is AVX2 only, so the engine used to widen Q4_1 to
//! Q8_0 (1.5× the bytes). Here weights keep their GGUF blocks (same bits, same
//! bytes), only rearranged at load into the order the kernels stream:
//!
//! - rows in groups of [`RG`] = 16 (one AVX-512 register of `i32` lanes; a
//!   last partial group is padded with zero rows). Per (row group, block),
//!   the 32 values of the 16 rows come as 4-value runs: run `q` (elements
//!   `4q..4q+4`) of all 16 rows fills 64 bytes, row `ρ` at bytes `4ρ..4ρ+4`.
//!   So one `vpdpbusd` against 4 activation bytes broadcast to every lane
//!   adds 4 products to each of 16 rows' dots, and a block's dot sums whole
//!   in one `i32` lane per row: no horizontal sums, no shuffles;
//! - Q4: runs `2c` and `2c+1` share 64 bytes (low and high nibbles), so one
//!   load, a shift and two ANDs unpack two runs;
//! - Q8_0 values are stored `+128` as unsigned bytes (VNNI multiplies unsigned
//!   by signed bytes); the offset comes back out through the block sums;
//! - block scales (and Q4_1's minimums) sit in their own `f16` arrays, the
//!   16 rows of a group side by side (one `vcvtph2ps` per block).
//!
//! A block's contribution is `d_w·d_x·Σ w_j·x_j + c_w·s_x`, with `s_x = d_x·Σ x_j`
//! and `c_w` = the minimum (Q4_1), `−8·d_w` (Q4_0) or `−128·d_w` (Q8_0). The
//! activations of a matrix product are quantized once ([`QActs`]) and shared
//! by the matrices that read the same input (q|k|v, gate|up).
//!
//! Kernels: register tiles of one row group × up to 8 activation rows (AVX-512
//! VNNI; decode is the 1-row tile) or 8 weight rows × up to 4 activation rows
//! (AVX2, `vpmaddubsw`), each weight loaded once per tile, and a scalar
//! reference, picked at run time ([`Kernel::best`]; the environment
//! variable `ANCHORCODER_KERNEL=scalar|avx2|avx512vnni` forces a lower one for
//! comparisons). Rows are split over candle's worker pool, the one the rest of
//! the engine uses.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use half::f16;

/// Elements per quantization block (all formats here).
pub const QK: usize = 32;

/// A weight format this module multiplies natively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 4 bits, one scale per block, values `d·(q − 8)`.
    Q4_0,
    /// 4 bits, a scale and a minimum per block, values `d·q + m`.
    Q4_1,
    /// 8 bits, one scale per block, values `d·q`.
    Q8_0,
}

const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q8_0: u8 = 2;

impl Format {
    /// Bytes of one GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// Weight rows interleaved together (one AVX-512 register of `i32` lanes).
pub const RG: usize = 16;

/// A weight matrix `[n, k]` (row `r` gives output `r`), quantized per row in
/// blocks of [`QK`], stored in groups of [`RG`] rows (see the module docs).
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    nb: usize,
    /// Per row group and block: Q4 `RG × 16` bytes, Q8_0 `RG × 32` bytes
    /// (value + 128); rows padded to a multiple of [`RG`] with zeros.
    qs: Vec<u8>,
    /// Block scales, `RG` per (row group, block).
    d: Vec<f16>,
    /// Block minimums (Q4_1 only, else empty), laid out as `d`.
    m: Vec<f16>,
}

impl QMatrix {
    /// From GGUF block data (`n` rows of `k / 32` blocks each).
    pub fn from_gguf(format: Format, n: usize, k: usize, raw: &[u8]) -> Result<QMatrix> {
        if k == 0 || !k.is_multiple_of(QK) {
            bail!("a {format:?} matrix needs rows of a multiple of {QK} values, got {k}");
        }
        let nb = k / QK;
        if raw.len() != n * nb * format.block_bytes() {
            bail!(
                "{format:?} data of {} bytes for a {n}×{k} matrix (expected {})",
                raw.len(),
                n * nb * format.block_bytes()
            );
        }
        let half = |b: &[u8], o: usize| f16::from_le_bytes([b[o], b[o + 1]]);
        let mut w = QMatrix::zeros(format, n, k);
        for (i, blk) in raw.chunks_exact(format.block_bytes()).enumerate() {
            let (r, b) = (i / nb, i % nb);
            let si = w.scale_index(r, b);
            w.d[si] = half(blk, 0);
            let mut vals = [0u8; QK];
            match format {
                Format::Q4_0 | Format::Q4_1 => {
                    let qs = if format == Format::Q4_1 {
                        w.m[si] = half(blk, 2);
                        &blk[4..20]
                    } else {
                        &blk[2..18]
                    };
                    for j in 0..16 {
                        vals[j] = qs[j] & 0x0F;
                        vals[j + 16] = qs[j] >> 4;
                    }
                }
                Format::Q8_0 => {
                    for j in 0..QK {
                        vals[j] = (blk[2 + j] as i8 as i16 + 128) as u8;
                    }
                }
            }
            w.set_block(r, b, &vals);
        }
        Ok(w)
    }

    /// Quantize `data` (`n × k`, row-major) to Q8_0 as ggml does (scale =
    /// largest magnitude / 127, values rounded).
    pub fn quantize_q8_0(data: &[f32], n: usize, k: usize) -> Result<QMatrix> {
        if k == 0 || !k.is_multiple_of(QK) || data.len() != n * k {
            bail!("cannot quantize {} values as a {n}×{k} Q8_0 matrix (rows must be a multiple of {QK})", data.len());
        }
        let nb = k / QK;
        let mut w = QMatrix::zeros(Format::Q8_0, n, k);
        for (i, x) in data.chunks_exact(QK).enumerate() {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            let mut vals = [0u8; QK];
            for (v, x) in vals.iter_mut().zip(x) {
                *v = ((x * id).round() as i32 + 128) as u8;
            }
            let si = w.scale_index(i / nb, i % nb);
            w.d[si] = f16::from_f32(d);
            w.set_block(i / nb, i % nb, &vals);
        }
        Ok(w)
    }

    fn zeros(format: Format, n: usize, k: usize) -> QMatrix {
        let nb = k / QK;
        let np = n.next_multiple_of(RG);
        let q_bytes = if format == Format::Q8_0 { np * k } else { np * nb * 16 };
        let m = if format == Format::Q4_1 { vec![f16::ZERO; np * nb] } else { Vec::new() };
        QMatrix { format, n, k, nb, qs: vec![0; q_bytes], d: vec![f16::ZERO; np * nb], m }
    }

    /// Index of row `r`'s block `b` in `d` and `m`.
    fn scale_index(&self, r: usize, b: usize) -> usize {
        ((r / RG) * self.nb + b) * RG + r % RG
    }

    /// Byte offset and nibble shift (Q4) of element `j` of row `r`'s block `b`.
    fn value_at(&self, r: usize, b: usize, j: usize) -> (usize, u32) {
        let (g, lane) = (r / RG, r % RG);
        match self.format {
            Format::Q8_0 => ((g * self.nb + b) * RG * QK + (j / 4) * 4 * RG + lane * 4 + j % 4, 0),
            _ => {
                let (c, hi, e) = (j / 8, (j / 4) % 2, j % 4);
                ((g * self.nb + b) * RG * 16 + c * 4 * RG + lane * 4 + e, hi as u32 * 4)
            }
        }
    }

    /// Store block `b` of row `r` from its 32 unsigned values (0–15 for Q4).
    fn set_block(&mut self, r: usize, b: usize, vals: &[u8; QK]) {
        for (j, &v) in vals.iter().enumerate() {
            let (o, shift) = self.value_at(r, b, j);
            self.qs[o] = self.qs[o] & !(0xFFu8.wrapping_shr(8 - self.width()) << shift) | v << shift;
        }
    }

    /// Bits per stored value.
    fn width(&self) -> u32 {
        if self.format == Format::Q8_0 {
            8
        } else {
            4
        }
    }

    /// The 32 stored unsigned values of block `b` of row `r`.
    fn block(&self, r: usize, b: usize) -> [u8; QK] {
        let mask = 0xFFu8.wrapping_shr(8 - self.width());
        std::array::from_fn(|j| {
            let (o, shift) = self.value_at(r, b, j);
            (self.qs[o] >> shift) & mask
        })
    }

    /// `c_w` of row `r`'s block `b`: what multiplies the activation block's sum.
    fn sum_coef(&self, r: usize, b: usize) -> f32 {
        let i = self.scale_index(r, b);
        match self.format {
            Format::Q4_0 => -8.0 * self.d[i].to_f32(),
            Format::Q4_1 => self.m[i].to_f32(),
            Format::Q8_0 => -128.0 * self.d[i].to_f32(),
        }
    }

    /// Row `r` as `f32` values (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (d, c) = (self.d[self.scale_index(r, b)].to_f32(), self.sum_coef(r, b));
            for (o, &v) in o.iter_mut().zip(&self.block(r, b)) {
                *o = d * v as f32 + c;
            }
        }
    }

    /// The whole matrix as `f32` (`n × k`).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (r, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The weight format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes held (values, scales, minimums).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len())
    }
}

/// Activation rows (`rows × k`) quantized to 8 bits per block of 32, with
/// each block's scale `d` and scaled sum `s = d·Σq` (ggml's Q8_1).
pub struct QActs {
    rows: usize,
    k: usize,
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl QActs {
    /// Quantize `x` (`rows × k`, row-major; `k` a multiple of 32), rows split
    /// over the worker pool when there are many.
    pub fn quantize(x: &[f32], k: usize) -> QActs {
        assert!(
            k > 0 && k.is_multiple_of(QK) && x.len().is_multiple_of(k),
            "activations of {} values in rows of {k}",
            x.len()
        );
        let (rows, nb) = (x.len() / k, k / QK);
        let mut a = QActs { rows, k, nb, qs: vec![0; rows * k], d: vec![0.0; rows * nb], s: vec![0.0; rows * nb] };
        let ptrs = (a.qs.as_mut_ptr() as usize, a.d.as_mut_ptr() as usize, a.s.as_mut_ptr() as usize);
        // The vector version gives the same bytes as `quantize_block` (tests).
        #[cfg(target_arch = "x86_64")]
        let simd = Kernel::best() >= Kernel::Avx2;
        let quantize_rows = |range: std::ops::Range<usize>| {
            for i in range.start * nb..range.end * nb {
                // SAFETY: block `i` lies inside the three buffers (sized above) and
                // every block is written by exactly one range.
                let (q, d, s) = unsafe {
                    (
                        std::slice::from_raw_parts_mut((ptrs.0 as *mut i8).add(i * QK), QK),
                        &mut *(ptrs.1 as *mut f32).add(i),
                        &mut *(ptrs.2 as *mut f32).add(i),
                    )
                };
                let xb = &x[i * QK..(i + 1) * QK];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: AVX2/FMA/F16C are there (`simd`); 32 values in, 32 out.
                    (*d, *s) = unsafe { quantize_block_avx2(xb, q) };
                    continue;
                }
                (*d, *s) = quantize_block(xb, q);
            }
        };
        if rows >= 8 {
            candle_core::utils::barrier_pool().execute_chunked(rows, quantize_rows);
        } else {
            quantize_rows(0..rows);
        }
        a
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// One block to `i8` (scale = largest magnitude / 127); returns `(d, d·Σq)`.
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut sum = 0i32;
    for (q, x) in q.iter_mut().zip(x) {
        let v = (x * id).round() as i32;
        *q = v as i8;
        sum += v;
    }
    (d, d * sum as f32)
}

/// [`quantize_block`] in AVX2, bit for bit (finite inputs): the same
/// `x · (1/d)` products, rounded half away from zero as `f32::round` does
/// (`trunc(v ± 0.49999997)`, exact for every `f32`).
///
/// # Safety
/// The CPU has AVX2/FMA/F16C; `x` and `q` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    debug_assert!(x.len() == QK && q.len() == QK);
    let sign = _mm256_set1_ps(-0.0);
    let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(x.as_ptr().add(8 * j)));
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
    let half = _mm256_set1_ps(0.499_999_97);
    let iv: [__m256i; 4] = std::array::from_fn(|j| {
        let p = _mm256_mul_ps(v[j], id);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm256_add_ps(
            p,
            _mm256_or_ps(half, _mm256_and_ps(p, sign)),
        ));
        _mm256_cvttps_epi32(r)
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum)));
    // Packing interleaves 4-value runs per 128-bit lane; the permute undoes it.
    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
    (d, d * sum as f32)
}

/// Which dot-product code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Plain Rust: the reference, and what runs without AVX2.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 (F, BW, VL) with VNNI.
    Avx512Vnni,
}

impl Kernel {
    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            match self {
                Kernel::Scalar => true,
                Kernel::Avx2 => avx2,
                Kernel::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Scalar
        }
    }

    /// The fastest available kernel, capped by `ANCHORCODER_KERNEL` if set
    /// (detected once).
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("ANCHORCODER_KERNEL").as_deref() {
                Ok("scalar") => Kernel::Scalar,
                Ok("avx2") => Kernel::Avx2,
                _ => Kernel::Avx512Vnni,
            };
            [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Scalar]
                .into_iter()
                .find(|k| *k <= cap && k.available())
                .unwrap_or(Kernel::Scalar)
        })
    }
}

/// Activation rows per tile of the AVX-512 VNNI kernel (its accumulators:
/// 8 × 2 registers of 16 lanes, the weights loaded once per tile).
const TILE_VNNI: usize = 8;
/// Activation rows per tile of the AVX2 kernel (16 vector registers).
const TILE_AVX2: usize = 4;

impl Kernel {
    /// Activation rows one call of this kernel multiplies against a row group.
    fn tile_rows(self) -> usize {
        match self {
            Kernel::Avx512Vnni => TILE_VNNI,
            Kernel::Avx2 => TILE_AVX2,
            Kernel::Scalar => 1,
        }
    }
}

/// `x · Wᵀ` for each `W` in `ws` (all `k` wide, as `x`): one `x.rows × n`
/// output per matrix, on the best kernel.
pub fn matmul(ws: &[&QMatrix], x: &QActs) -> Vec<Vec<f32>> {
    matmul_with(Kernel::best(), ws, x)
}

/// [`matmul`] on a given kernel (which must be [`Kernel::available`]).
pub fn matmul_with(kernel: Kernel, ws: &[&QMatrix], x: &QActs) -> Vec<Vec<f32>> {
    assert!(kernel.available(), "{kernel:?} does not run on this CPU");
    for w in ws {
        assert_eq!(w.k, x.k, "a {}-wide matrix times {}-wide activations", w.k, x.k);
    }
    let m = x.rows;
    // Not zeroed: the work items below write every element (m × n per matrix).
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.n)).collect();
    // Work items: the row groups of each matrix in turn.
    let starts: Vec<usize> = ws
        .iter()
        .scan(0, |acc, w| {
            let s = *acc;
            *acc += w.n.div_ceil(RG);
            Some(s)
        })
        .collect();
    let items = starts.last().map_or(0, |&s| s + ws.last().unwrap().n.div_ceil(RG));
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    let tile = kernel.tile_rows();
    let run = |range: std::ops::Range<usize>| {
        for item in range {
            let which = starts.partition_point(|&s| s <= item) - 1;
            let (w, g) = (ws[which], item - starts[which]);
            let out = out_ptrs[which] as *mut f32;
            let mut i0 = 0;
            while i0 < m {
                let t = (m - i0).min(tile);
                // SAFETY: each (activation row, weight row) output is written
                // by exactly one work item, inside `outs[which]` (m × n).
                unsafe { group_tile(kernel, w, g, x, i0, t, out) };
                i0 += t;
            }
        }
    };
    if items > 1 {
        candle_core::utils::barrier_pool().execute_chunked(items, run);
    } else {
        run(0..items);
    }
    for (o, w) in outs.iter_mut().zip(ws) {
        // SAFETY: the capacity is m × n and the row groups of all items, each
        // writing rows `16g..min(16g + 16, n)` of every activation row, cover it.
        unsafe { o.set_len(m * w.n) };
    }
    outs
}

/// Row group `g` of `w` (rows `16g..`, those below `w.n`) times activation
/// rows `i0..i0 + t`, written to `out` (`x.rows × w.n`, row-major).
///
/// # Safety
/// `kernel` must be available; `g < ⌈w.n / 16⌉`, `1 <= t <= kernel.tile_rows()`,
/// `i0 + t <= x.rows`, `w.k == x.k`, `out` valid for `x.rows × w.n` values.
unsafe fn group_tile(kernel: Kernel, w: &QMatrix, g: usize, x: &QActs, i0: usize, t: usize, out: *mut f32) {
    macro_rules! by_rows {
        ($f:ident, $fmt:expr, $($t:literal)*) => {
            match t {
                $($t => $f::<$t, { $fmt }>(w, g, x, i0, out),)*
                _ => unreachable!("a tile of {t} rows"),
            }
        };
    }
    macro_rules! by_format {
        ($f:ident, $($t:literal)*) => {
            match w.format {
                Format::Q4_0 => by_rows!($f, F_Q4_0, $($t)*),
                Format::Q4_1 => by_rows!($f, F_Q4_1, $($t)*),
                Format::Q8_0 => by_rows!($f, F_Q8_0, $($t)*),
            }
        };
    }
    match kernel {
        Kernel::Scalar => {
            for i in i0..i0 + t {
                for r in g * RG..((g + 1) * RG).min(w.n) {
                    *out.add(i * w.n + r) = dot_scalar(w, r, x, i);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => by_format!(tile_avx2, 1 2 3 4),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => by_format!(tile_vnni, 1 2 3 4 5 6 7 8),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the scalar kernel exists off x86-64"),
    }
}

/// The reference: integer dots per block, then scales.
fn dot_scalar(w: &QMatrix, r: usize, x: &QActs, i: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..w.nb {
        let (wi, xi) = (w.scale_index(r, b), i * x.nb + b);
        let xq = &x.qs[i * x.k + b * QK..][..QK];
        let dot: i32 = w.block(r, b).iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
        acc += w.d[wi].to_f32() * x.d[xi] * dot as f32 + w.sum_coef(r, b) * x.s[xi];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Four activation bytes (elements `j..j + 4` of row `i`) in every 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn x4(x: &QActs, i: usize, j: usize) -> i32 {
    (x.qs.as_ptr().add(i * x.k + j) as *const i32).read_unaligned()
}

/// AVX-512 VNNI register tile: 16 weight rows (one row group) × `R`
/// activation rows. Per block, each `vpdpbusd` multiplies 4 values of the 16
/// rows by 4 activation bytes broadcast to every lane, so a block's dot
/// accumulates whole in `i32` lanes (one per weight row: no horizontal sums,
/// no shuffles); then one convert and two FMAs per tile row apply the block's
/// scales. The weights are loaded (and Q4 unpacked) once per tile.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; indices as in [`group_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const R: usize, const F: u8>(w: &QMatrix, g: usize, x: &QActs, i0: usize, out: *mut f32) {
    let nb = w.nb;
    let low4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let bi = g * nb + b;
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(bi * RG) as *const __m256i));
        let coef = match F {
            F_Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(w.m.as_ptr().add(bi * RG) as *const __m256i)),
            F_Q4_0 => _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
            _ => _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
        };
        let mut dot = [_mm512_setzero_si512(); R];
        if F == F_Q8_0 {
            let wq = w.qs.as_ptr().add(bi * RG * QK);
            for q in 0..QK / 4 {
                let wv = _mm512_loadu_si512(wq.add(q * 4 * RG) as *const _);
                for (i, d) in dot.iter_mut().enumerate() {
                    *d = _mm512_dpbusd_epi32(*d, wv, _mm512_set1_epi32(x4(x, i0 + i, b * QK + 4 * q)));
                }
            }
        } else {
            let wq = w.qs.as_ptr().add(bi * RG * 16);
            for c in 0..QK / 8 {
                let packed = _mm512_loadu_si512(wq.add(c * 4 * RG) as *const _);
                let lo = _mm512_and_si512(packed, low4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low4);
                for (i, d) in dot.iter_mut().enumerate() {
                    let j = b * QK + 8 * c;
                    *d = _mm512_dpbusd_epi32(*d, lo, _mm512_set1_epi32(x4(x, i0 + i, j)));
                    *d = _mm512_dpbusd_epi32(*d, hi, _mm512_set1_epi32(x4(x, i0 + i, j + 4)));
                }
            }
        }
        for i in 0..R {
            let xb = (i0 + i) * nb + b;
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(xb)));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), scale, acc[i]);
            acc[i] = _mm512_fmadd_ps(coef, _mm512_set1_ps(*x.s.get_unchecked(xb)), acc[i]);
        }
    }
    let r0 = g * RG;
    let mask: __mmask16 = (((1u32 << (w.n - r0).min(RG)) - 1) & 0xFFFF) as u16;
    for (i, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add((i0 + i) * w.n + r0), mask, *a);
    }
}

/// AVX2 register tile: 8 weight rows (half a row group) × `R` activation
/// rows, the same scheme as [`tile_vnni`] with `vpmaddubsw`. Q4 products add
/// up in 16 bits over a whole block (at most 16 · 15 · 127 = 30,480 per lane);
/// Q8_0 takes the sign trick (its unsigned values would saturate) and widens
/// each product to 32 bits.
///
/// # Safety
/// The CPU has AVX2/FMA/F16C; indices as in [`group_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const F: u8>(w: &QMatrix, g: usize, x: &QActs, i0: usize, out: *mut f32) {
    let nb = w.nb;
    let (low4, ones, flip) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1), _mm256_set1_epi8(-128));
    for h in 0..2 {
        let r0 = g * RG + 8 * h;
        if r0 >= w.n {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let bi = g * nb + b;
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(bi * RG + 8 * h) as *const __m128i));
            let coef = match F {
                F_Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(bi * RG + 8 * h) as *const __m128i)),
                _ => _mm256_mul_ps(dw, _mm256_set1_ps(-8.0)),
            };
            let mut dot = [_mm256_setzero_si256(); R];
            if F == F_Q8_0 {
                let wq = w.qs.as_ptr().add(bi * RG * QK + 32 * h);
                for q in 0..QK / 4 {
                    let signed = _mm256_xor_si256(_mm256_loadu_si256(wq.add(q * 4 * RG) as *const __m256i), flip);
                    let mag = _mm256_sign_epi8(signed, signed);
                    for (i, d) in dot.iter_mut().enumerate() {
                        let xv = _mm256_set1_epi32(x4(x, i0 + i, b * QK + 4 * q));
                        let prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(xv, signed));
                        *d = _mm256_add_epi32(*d, _mm256_madd_epi16(prod, ones));
                    }
                }
            } else {
                let wq = w.qs.as_ptr().add(bi * RG * 16 + 32 * h);
                for c in 0..QK / 8 {
                    let packed = _mm256_loadu_si256(wq.add(c * 4 * RG) as *const __m256i);
                    let lo = _mm256_and_si256(packed, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low4);
                    for (i, d) in dot.iter_mut().enumerate() {
                        let j = b * QK + 8 * c;
                        let p = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x4(x, i0 + i, j)));
                        let p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x4(x, i0 + i, j + 4))));
                        *d = _mm256_add_epi16(*d, p);
                    }
                }
                for d in dot.iter_mut() {
                    *d = _mm256_madd_epi16(*d, ones);
                }
            }
            for i in 0..R {
                let xb = (i0 + i) * nb + b;
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xb)));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), scale, acc[i]);
                if F != F_Q8_0 {
                    acc[i] = _mm256_fmadd_ps(coef, _mm256_set1_ps(*x.s.get_unchecked(xb)), acc[i]);
                }
            }
        }
        let rows = (w.n - r0).min(8);
        for (i, a) in acc.iter().enumerate() {
            let mut buf = [0f32; 8];
            _mm256_storeu_ps(buf.as_mut_ptr(), *a);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), out.add((i0 + i) * w.n + r0), rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// GGUF blocks of `data` in `format`, quantized as ggml does.
    fn gguf_blocks(format: Format, data: &[f32]) -> Vec<u8> {
        let mut raw = Vec::new();
        for x in data.chunks_exact(QK) {
            let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            match format {
                Format::Q4_0 => {
                    let max = x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                    raw.extend(f16::from_f32(d).to_le_bytes());
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    raw.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
                }
                Format::Q4_1 => {
                    let d = (hi - lo) / 15.0;
                    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                    raw.extend(f16::from_f32(d).to_le_bytes());
                    raw.extend(f16::from_f32(lo).to_le_bytes());
                    let q = |v: f32| (((v - lo) * id + 0.5) as i32).clamp(0, 15) as u8;
                    raw.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
                }
                Format::Q8_0 => {
                    let d = x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                    raw.extend(f16::from_f32(d).to_le_bytes());
                    raw.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
                }
            }
        }
        raw
    }

    /// GGUF's own dequantization of the blocks, independent of our layout.
    fn gguf_dequantize(format: Format, raw: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        for b in raw.chunks_exact(format.block_bytes()) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            match format {
                Format::Q8_0 => out.extend(b[2..].iter().map(|&q| d * q as i8 as f32)),
                _ => {
                    let (m, qs) = if format == Format::Q4_1 {
                        (f16::from_le_bytes([b[2], b[3]]).to_f32(), &b[4..20])
                    } else {
                        (-8.0 * d, &b[2..18])
                    };
                    out.extend(qs.iter().map(|&q| d * (q & 0x0F) as f32 + m));
                    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
            }
        }
        out
    }

    const FORMATS: [Format; 3] = [Format::Q4_0, Format::Q4_1, Format::Q8_0];

    #[test]
    fn layout_round_trips_gguf_blocks() {
        for format in FORMATS {
            for (n, k) in [(3, 32), (5, 96), (2, 576), (16, 544), (48, 576), (37, 1536)] {
                let raw = gguf_blocks(format, &random(n * k, 1));
                let w = QMatrix::from_gguf(format, n, k, &raw).unwrap();
                assert_eq!(w.dequantize(), gguf_dequantize(format, &raw), "{format:?} {n}×{k}");
                // Same bytes as the GGUF blocks; a last partial row group is padded.
                let padded = raw.len() / n * n.next_multiple_of(RG);
                assert_eq!(w.bytes(), padded, "{format:?} {n}×{k}");
                if n.is_multiple_of(RG) {
                    assert_eq!(w.bytes(), raw.len());
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::from_gguf(Format::Q4_1, 2, 48, &[0; 60]).is_err());
        assert!(QMatrix::from_gguf(Format::Q4_1, 2, 64, &[0; 79]).is_err());
        assert!(QMatrix::quantize_q8_0(&[0.0; 40], 1, 40).is_err());
    }

    #[test]
    fn activation_blocks_reconstruct_the_input() {
        let x = random(3 * 576, 9);
        let a = QActs::quantize(&x, 576);
        for (i, v) in x.iter().enumerate() {
            let b = i / QK;
            assert!((a.d[b] * a.qs[i] as f32 - v).abs() <= a.d[b] * 0.5 + 1e-6);
        }
        for b in 0..a.d.len() {
            let sum: i32 = a.qs[b * QK..(b + 1) * QK].iter().map(|&q| q as i32).sum();
            assert!((a.s[b] - a.d[b] * sum as f32).abs() < 1e-5);
        }
    }

    /// Every kernel equals the scalar reference, and all approximate the
    /// `f32` product of the dequantized weights, on awkward shapes: odd block
    /// counts (a lone last block), weight rows not a multiple of the row group,
    /// activation rows from 1 to several tiles, not a multiple of either tile.
    #[test]
    fn kernels_match_reference_and_f32() {
        let kernels: Vec<Kernel> =
            [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512Vnni].into_iter().filter(|k| k.available()).collect();
        for format in FORMATS {
            let shapes = [
                (1, 37, 576),
                (3, 19, 1536),
                (7, 33, 96),
                (5, 17, 32),
                (2, 40, 544),
                (1, 3, 32 * 17),
                (8, 16, 576),
                (9, 37, 576),
                (13, 48, 1536),
                (21, 25, 544),
                (4, 7, 32),
            ];
            for &(m, n, k) in &shapes {
                let raw = gguf_blocks(format, &random(n * k, n as u64));
                let w = QMatrix::from_gguf(format, n, k, &raw).unwrap();
                let x = random(m * k, k as u64 + 1);
                let a = QActs::quantize(&x, k);
                let wf = w.dequantize();
                let reference = matmul_with(Kernel::Scalar, &[&w], &a).remove(0);
                for &kernel in &kernels {
                    let got = matmul_with(kernel, &[&w, &w], &a);
                    assert_eq!(got.len(), 2);
                    for (i, (g, r)) in got[0].iter().zip(&reference).enumerate() {
                        assert!(
                            (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                            "{kernel:?} {format:?} ({m},{n},{k}) [{i}]: {g} vs {r}"
                        );
                    }
                    assert_eq!(got[0], got[1]);
                }
                // Against f32: exactly the product of the dequantized weights and
                // dequantized activations, and within the activations' rounding of x.
                let xf: Vec<f32> = (0..m * k).map(|j| a.d[j / QK] * a.qs[j] as f32).collect();
                for i in 0..m {
                    for r in 0..n {
                        let dot = |x: &[f32]| (0..k).map(|j| wf[r * k + j] * x[i * k + j]).sum::<f32>();
                        let (same, exact) = (dot(&xf), dot(&x));
                        let mag: f32 = (0..k).map(|j| (wf[r * k + j] * xf[i * k + j]).abs()).sum();
                        let bound: f32 = (0..k).map(|j| wf[r * k + j].abs()).sum::<f32>() / 254.0;
                        let got = reference[i * n + r];
                        assert!(
                            (got - same).abs() <= 1e-5 * mag + 1e-6,
                            "{format:?} ({m},{n},{k}) [{i},{r}]: {got} vs {same}"
                        );
                        assert!((got - exact).abs() <= bound, "{format:?} ({m},{n},{k}) [{i},{r}]: {got} vs {exact}");
                    }
                }
            }
        }
    }

    /// The vector quantization gives the reference's bytes, scales and sums,
    /// ties (`k + 0.5`) included.
    #[test]
    fn activation_quantization_simd_equals_scalar() {
        if !Kernel::Avx2.available() {
            return;
        }
        let mut x = random(64 * QK, 3);
        x.extend(random(3 * QK, 4).iter().map(|v| v * 1e-30));
        x.extend([0.0; QK]);
        let ties: Vec<f32> = (0..QK).map(|j| if j == 0 { 127.0 } else { j as f32 / 2.0 - 8.0 }).collect();
        x.extend(&ties);
        x.extend(ties.iter().map(|v| -v));
        for xb in x.chunks_exact(QK) {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let want = quantize_block(xb, &mut a);
            // SAFETY: AVX2 checked above; 32 values each.
            let got = unsafe { quantize_block_avx2(xb, &mut b) };
            assert_eq!((got.0.to_bits(), got.1.to_bits(), b), (want.0.to_bits(), want.1.to_bits(), a), "{xb:?}");
        }
    }

    #[test]
    fn q8_0_quantization_matches_gguf() {
        let data = random(4 * 64, 5);
        let w = QMatrix::quantize_q8_0(&data, 4, 64).unwrap();
        let raw = gguf_blocks(Format::Q8_0, &data);
        assert_eq!(w.dequantize(), gguf_dequantize(Format::Q8_0, &raw));
    }
}
