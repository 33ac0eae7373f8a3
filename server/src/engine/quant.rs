//! Quantized matrix products on the CPU: 4-bit (Q4_0, Q4_1) and 8-bit (Q8_0)
//! weights times activations quantized to 8 bits, as llama.cpp does.
//!
//! Why our own: decode reads every weight once per token, so its speed is the
//! bytes of weights. candle has no SIMD path for Q4_1 (the default model's
//! format) and its Q8_0 one is AVX2 only, so the engine used to widen Q4_1 to
//! Q8_0 (1.5× the bytes). Here weights keep their GGUF blocks (same bits, same
//! bytes), only rearranged at load so a SIMD register unpacks with few
//! instructions:
//!
//! - per row, the 4-bit values of blocks `2p` and `2p+1` share 32 bytes: byte
//!   `j` holds element `j` of block `2p` in its low nibble and element `j` of
//!   block `2p+1` in its high nibble (a lone last block keeps GGUF's layout:
//!   elements `j` and `j+16`);
//! - Q8_0 values are stored `+128` as unsigned bytes (VNNI multiplies unsigned
//!   by signed bytes); the offset comes back out through the block sums;
//! - block scales (and Q4_1's minimums) sit in their own `f16` arrays.
//!
//! A block's contribution is `d_w·d_x·Σ w_j·x_j + c_w·s_x`, with `s_x = d_x·Σ x_j`
//! and `c_w` = the minimum (Q4_1), `−8·d_w` (Q4_0) or `−128·d_w` (Q8_0). The
//! activations of a matrix product are quantized once ([`QActs`]) and shared
//! by the matrices that read the same input (q|k|v, gate|up).
//!
//! Kernels: AVX-512 VNNI (two blocks per `vpdpbusd`), AVX2 (`vpmaddubsw`) and a
//! scalar reference, picked at run time ([`Kernel::best`]; the environment
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

/// A weight matrix `[n, k]` (row `r` gives output `r`), quantized per row in
/// blocks of [`QK`].
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    nb: usize,
    /// Q4: `n × nb × 16` bytes (pair layout, see the module docs); Q8_0:
    /// `n × k` bytes, value + 128.
    qs: Vec<u8>,
    /// `n × nb` block scales.
    d: Vec<f16>,
    /// `n × nb` block minimums (Q4_1 only, else empty).
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
            w.d[i] = half(blk, 0);
            let mut vals = [0u8; QK];
            match format {
                Format::Q4_0 | Format::Q4_1 => {
                    let qs = if format == Format::Q4_1 {
                        w.m[i] = half(blk, 2);
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
            w.d[i] = f16::from_f32(d);
            w.set_block(i / nb, i % nb, &vals);
        }
        Ok(w)
    }

    fn zeros(format: Format, n: usize, k: usize) -> QMatrix {
        let nb = k / QK;
        let q_bytes = if format == Format::Q8_0 { n * k } else { n * nb * 16 };
        let m = if format == Format::Q4_1 { vec![f16::ZERO; n * nb] } else { Vec::new() };
        QMatrix { format, n, k, nb, qs: vec![0; q_bytes], d: vec![f16::ZERO; n * nb], m }
    }

    /// Store block `b` of row `r` from its 32 unsigned values (0–15 for Q4).
    fn set_block(&mut self, r: usize, b: usize, vals: &[u8; QK]) {
        let nb = self.nb;
        match self.format {
            Format::Q8_0 => self.qs[r * self.k + b * QK..][..QK].copy_from_slice(vals),
            _ => {
                let row = &mut self.qs[r * nb * 16..(r + 1) * nb * 16];
                if nb % 2 == 1 && b == nb - 1 {
                    for j in 0..16 {
                        row[b * 16 + j] = vals[j] | vals[j + 16] << 4;
                    }
                } else {
                    let (pair, shift) = (b / 2 * 32, (b % 2) as u32 * 4);
                    for j in 0..QK {
                        row[pair + j] = row[pair + j] & !(0x0F << shift) | vals[j] << shift;
                    }
                }
            }
        }
    }

    /// The 32 stored unsigned values of block `b` of row `r`.
    fn block(&self, r: usize, b: usize) -> [u8; QK] {
        let nb = self.nb;
        let mut vals = [0u8; QK];
        match self.format {
            Format::Q8_0 => vals.copy_from_slice(&self.qs[r * self.k + b * QK..][..QK]),
            _ => {
                let row = &self.qs[r * nb * 16..(r + 1) * nb * 16];
                if nb % 2 == 1 && b == nb - 1 {
                    for j in 0..16 {
                        vals[j] = row[b * 16 + j] & 0x0F;
                        vals[j + 16] = row[b * 16 + j] >> 4;
                    }
                } else {
                    let shift = (b % 2) * 4;
                    for (j, v) in vals.iter_mut().enumerate() {
                        *v = (row[b / 2 * 32 + j] >> shift) & 0x0F;
                    }
                }
            }
        }
        vals
    }

    /// `c_w` of block `i` (flat index): what multiplies the activation block's sum.
    fn sum_coef(&self, i: usize) -> f32 {
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
            let i = r * self.nb + b;
            let (d, c) = (self.d[i].to_f32(), self.sum_coef(i));
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
                (*d, *s) = quantize_block(&x[i * QK..(i + 1) * QK], q);
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

/// Weight rows per work item of the pool.
const ROW_CHUNK: usize = 16;
/// Activation rows multiplied together against one weight row (prefill).
const TILE: usize = 4;

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
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
    // Work items: chunks of rows of each matrix in turn.
    let starts: Vec<usize> = ws
        .iter()
        .scan(0, |acc, w| {
            let s = *acc;
            *acc += w.n.div_ceil(ROW_CHUNK);
            Some(s)
        })
        .collect();
    let items = starts.last().map_or(0, |&s| s + ws.last().unwrap().n.div_ceil(ROW_CHUNK));
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    let run = |range: std::ops::Range<usize>| {
        for item in range {
            let which = starts.partition_point(|&s| s <= item) - 1;
            let w = ws[which];
            let r0 = (item - starts[which]) * ROW_CHUNK;
            let rows = r0..(r0 + ROW_CHUNK).min(w.n);
            let out = out_ptrs[which] as *mut f32;
            let mut i0 = 0;
            while i0 < m {
                let t = (m - i0).min(TILE);
                for r in rows.clone() {
                    // SAFETY: each (activation row, weight row) output is written
                    // by exactly one work item, inside `outs[which]` (m × n).
                    unsafe {
                        let mut y = [0f32; TILE];
                        dot_tile(kernel, w, r, x, i0, &mut y[..t]);
                        for (i, v) in y[..t].iter().enumerate() {
                            *out.add((i0 + i) * w.n + r) = *v;
                        }
                    }
                }
                i0 += t;
            }
        }
    };
    if items > 1 {
        candle_core::utils::barrier_pool().execute_chunked(items, run);
    } else {
        run(0..items);
    }
    outs
}

/// Dots of weight row `r` with activation rows `i0..i0 + out.len()` (1–4).
///
/// # Safety
/// `kernel` must be available; `r < w.n`, `i0 + out.len() <= x.rows`, `w.k == x.k`.
unsafe fn dot_tile(kernel: Kernel, w: &QMatrix, r: usize, x: &QActs, i0: usize, out: &mut [f32]) {
    macro_rules! by_rows {
        ($f:ident, $fmt:expr) => {
            match out.len() {
                1 => out.copy_from_slice(&$f::<1, { $fmt }>(w, r, x, i0)),
                2 => out.copy_from_slice(&$f::<2, { $fmt }>(w, r, x, i0)),
                3 => out.copy_from_slice(&$f::<3, { $fmt }>(w, r, x, i0)),
                _ => out.copy_from_slice(&$f::<4, { $fmt }>(w, r, x, i0)),
            }
        };
    }
    macro_rules! by_format {
        ($f:ident) => {
            match w.format {
                Format::Q4_0 => by_rows!($f, F_Q4_0),
                Format::Q4_1 => by_rows!($f, F_Q4_1),
                Format::Q8_0 => by_rows!($f, F_Q8_0),
            }
        };
    }
    match kernel {
        Kernel::Scalar => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot_scalar(w, r, x, i0 + i);
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => by_format!(tile_avx2),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => by_format!(tile_vnni),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the scalar kernel exists off x86-64"),
    }
}

/// The reference: integer dots per block, then scales.
fn dot_scalar(w: &QMatrix, r: usize, x: &QActs, i: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..w.nb {
        let (wi, xi) = (r * w.nb + b, i * x.nb + b);
        let xq = &x.qs[i * x.k + b * QK..][..QK];
        let dot: i32 = w.block(r, b).iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
        acc += w.d[wi].to_f32() * x.d[xi] * dot as f32 + w.sum_coef(wi) * x.s[xi];
    }
    acc
}

/// One block's integer dot through the reference layout (a lone last Q4 block).
fn block_dot(w: &QMatrix, r: usize, b: usize, x: &QActs, i: usize) -> f32 {
    let xq = &x.qs[i * x.k + b * QK..][..QK];
    let dot: i32 = w.block(r, b).iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
    dot as f32
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// AVX-512 VNNI: two blocks per `vpdpbusd`, block scales 16 at a time.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; indices as in [`dot_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const R: usize, const F: u8>(w: &QMatrix, r: usize, x: &QActs, i0: usize) -> [f32; R] {
    let nb = w.nb;
    let wd = w.d.as_ptr().add(r * nb) as *const i16;
    let wm = if F == F_Q4_1 { w.m.as_ptr().add(r * nb) as *const i16 } else { wd };
    let wq = if F == F_Q8_0 { w.qs.as_ptr().add(r * w.k) } else { w.qs.as_ptr().add(r * nb * 16) };
    let low4 = _mm512_set1_epi8(0x0F);
    // The low nibbles (block 2p) fill the lower 256 bits, the high ones the upper.
    let shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    // Lanes 0–7 take block 2p's scale, lanes 8–15 block 2p+1's.
    let pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut lone = [0f32; R];
    let mut b0 = 0;
    while b0 < nb {
        let wn = (nb - b0).min(16);
        let mask: __mmask16 = (((1u32 << wn) - 1) & 0xFFFF) as u16;
        let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, wd.add(b0)));
        let coef = match F {
            F_Q4_1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, wm.add(b0))),
            F_Q4_0 => _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
            _ => _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
        };
        // Per activation row: the 16 blocks' combined scales d_w·d_x, and the sum terms.
        let mut scale = [_mm512_setzero_ps(); R];
        for i in 0..R {
            let xb = (i0 + i) * nb + b0;
            let dx = _mm512_maskz_loadu_ps(mask, x.d.as_ptr().add(xb));
            scale[i] = _mm512_mul_ps(dw, dx);
            acc[i] = _mm512_fmadd_ps(coef, _mm512_maskz_loadu_ps(mask, x.s.as_ptr().add(xb)), acc[i]);
        }
        for p in 0..wn / 2 {
            let b = b0 + 2 * p;
            let wv = if F == F_Q8_0 {
                _mm512_loadu_si512(wq.add(b * QK) as *const _)
            } else {
                let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(wq.add(b * 16) as *const __m256i));
                _mm512_and_si512(_mm512_srlv_epi64(packed, shifts), low4)
            };
            let idx = _mm512_add_epi32(pair_lanes, _mm512_set1_epi32(2 * p as i32));
            for i in 0..R {
                let xv = _mm512_loadu_si512(x.qs.as_ptr().add((i0 + i) * x.k + b * QK) as *const _);
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, scale[i]), acc[i]);
            }
        }
        if wn % 2 == 1 {
            let b = b0 + wn - 1;
            for (i, l) in lone.iter_mut().enumerate() {
                *l += w.d[r * nb + b].to_f32() * x.d[(i0 + i) * nb + b] * block_dot(w, r, b, x, i0 + i);
            }
        }
        b0 += 16;
    }
    std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) + lone[i])
}

/// AVX2: one block per `vpmaddubsw` (Q8_0 with the sign trick, since its
/// unsigned values would saturate the 16-bit sums), block scales 8 at a time.
///
/// # Safety
/// The CPU has AVX2/FMA/F16C; indices as in [`dot_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const F: u8>(w: &QMatrix, r: usize, x: &QActs, i0: usize) -> [f32; R] {
    let nb = w.nb;
    let wq = if F == F_Q8_0 { w.qs.as_ptr().add(r * w.k) } else { w.qs.as_ptr().add(r * nb * 16) };
    let (low4, ones, flip) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1), _mm256_set1_epi8(-128));
    // Up to 8 scales as a vector (a partial window is padded with zeros).
    let halves = |p: &[f16]| {
        let mut buf = [0u16; 8];
        buf.iter_mut().zip(p).for_each(|(b, h)| *b = h.to_bits());
        _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
    };
    let floats = |p: &[f32]| {
        let mut buf = [0f32; 8];
        buf[..p.len()].copy_from_slice(p);
        _mm256_loadu_ps(buf.as_ptr())
    };
    let mut acc = [_mm256_setzero_ps(); R];
    let mut lone = [0f32; R];
    let mut b0 = 0;
    while b0 < nb {
        let wn = (nb - b0).min(8);
        let wi = r * nb + b0;
        let dw = halves(&w.d[wi..wi + wn]);
        let mut scale = [_mm256_setzero_ps(); R];
        for i in 0..R {
            let xi = (i0 + i) * nb + b0;
            scale[i] = _mm256_mul_ps(dw, floats(&x.d[xi..xi + wn]));
            // The sum terms (Q8_0 takes its offset out through the sign trick).
            let coef = match F {
                F_Q4_1 => halves(&w.m[wi..wi + wn]),
                F_Q4_0 => _mm256_mul_ps(dw, _mm256_set1_ps(-8.0)),
                _ => continue,
            };
            acc[i] = _mm256_fmadd_ps(coef, floats(&x.s[xi..xi + wn]), acc[i]);
        }
        // One block's products with every activation row of the tile.
        macro_rules! block {
            ($j:expr, $wv:expr) => {{
                let (j, wv) = ($j, $wv);
                let lane = _mm256_set1_epi32(j as i32);
                for i in 0..R {
                    let xv = _mm256_loadu_si256(x.qs.as_ptr().add((i0 + i) * x.k + (b0 + j) * QK) as *const __m256i);
                    let prod = if F == F_Q8_0 {
                        let signed = _mm256_xor_si256(wv, flip);
                        _mm256_maddubs_epi16(_mm256_sign_epi8(signed, signed), _mm256_sign_epi8(xv, signed))
                    } else {
                        _mm256_maddubs_epi16(wv, xv)
                    };
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
                    acc[i] = _mm256_fmadd_ps(dot, _mm256_permutevar8x32_ps(scale[i], lane), acc[i]);
                }
            }};
        }
        let mut j = 0;
        while j < wn {
            let b = b0 + j;
            if F == F_Q8_0 {
                block!(j, _mm256_loadu_si256(wq.add(b * QK) as *const __m256i));
                j += 1;
            } else if j + 1 < wn {
                let packed = _mm256_loadu_si256(wq.add(b * 16) as *const __m256i);
                block!(j, _mm256_and_si256(packed, low4));
                block!(j + 1, _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4));
                j += 2;
            } else {
                for (i, l) in lone.iter_mut().enumerate() {
                    *l += w.d[r * nb + b].to_f32() * x.d[(i0 + i) * nb + b] * block_dot(w, r, b, x, i0 + i);
                }
                j += 1;
            }
        }
        b0 += 8;
    }
    std::array::from_fn(|i| {
        let v = acc[i];
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h) + lone[i]
    })
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
            for (n, k) in [(3, 32), (5, 96), (2, 576)] {
                let raw = gguf_blocks(format, &random(n * k, 1));
                let w = QMatrix::from_gguf(format, n, k, &raw).unwrap();
                assert_eq!(w.dequantize(), gguf_dequantize(format, &raw), "{format:?} {n}×{k}");
                assert_eq!(w.bytes(), raw.len(), "same bytes as the GGUF blocks");
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
    /// counts, rows not a multiple of the chunk, 1–7 activation rows.
    #[test]
    fn kernels_match_reference_and_f32() {
        let kernels: Vec<Kernel> =
            [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512Vnni].into_iter().filter(|k| k.available()).collect();
        for format in FORMATS {
            for &(m, n, k) in &[(1, 37, 576), (3, 19, 1536), (7, 33, 96), (5, 17, 32), (2, 40, 544), (1, 3, 32 * 17)] {
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

    #[test]
    fn q8_0_quantization_matches_gguf() {
        let data = random(4 * 64, 5);
        let w = QMatrix::quantize_q8_0(&data, 4, 64).unwrap();
        let raw = gguf_blocks(Format::Q8_0, &data);
        assert_eq!(w.dequantize(), gguf_dequantize(Format::Q8_0, &raw));
    }
}
