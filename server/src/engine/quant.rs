//! Quantized matrix products on the CPU: weights as GGUF stores them (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K) times
//! activations quantized to 8 bits, as llama.cpp does.
//!
//! Why our own: decode reads every weight once per token, so its speed is the
//! bytes of weights. candle has no SIMD path for Q4_1 (the default model's
//! format) and its Q8_0 one is AVX2 only, so the engine used to widen Q4_1 to
//! Q8_0 (1.5× the bytes). Here weights keep their GGUF bits (the same bytes,
//! within 3%), only rearranged at load into the order the kernels stream:
//!
//! - rows in groups of [`RG`] = 16 (one AVX-512 register of `i32` lanes; a
//!   last partial group is padded with zero rows). Per (row group, block of
//!   32), the 32 values of the 16 rows come as 4-value runs: run `q` (elements
//!   `4q..4q+4`) of all 16 rows fills 64 bytes, row `ρ` at bytes `4ρ..4ρ+4`.
//!   So one `vpdpbusd` against 4 activation bytes broadcast to every lane
//!   adds 4 products to each of 16 rows' dots, and a block's dot sums whole
//!   in one `i32` lane per row: no horizontal sums, no shuffles;
//! - the low 4 bits of a value: runs `2c` and `2c+1` share 64 bytes (low and
//!   high nibbles), so one load, a shift and two ANDs unpack two runs;
//! - the bits above them (Q5_0, Q5_1, Q5_K: 1; Q6_K: 2) in a plane of their
//!   own, laid out like the nibbles: byte `4ρ + e` of a 64-byte register holds
//!   that bit (or 2-bit field) of the 8 runs (Q5; Q6_K: of 4 runs, two
//!   registers per block), so a shift, an AND and an OR put it at bit 4;
//! - Q8_0 values are stored `+128` as unsigned bytes (VNNI multiplies unsigned
//!   by signed bytes); the offset comes back out through the block sums;
//! - scales and minimums sit in their own arrays, the 16 rows of a group side
//!   by side (one `vcvtph2ps` per block): `f16` per block for the 32-value
//!   formats; for the K-quants the super-block's `f16` `d` and `dmin` per 256
//!   values and the sub-block's 6-bit scale and minimum (Q4_K, Q5_K) or `i8`
//!   scales (Q6_K, one per 16 values) as bytes, multiplied in `f32` in the
//!   kernel: `d·sc` and `dmin·m` are exact there (11 × 8 bits), as in
//!   llama.cpp, where `f16` products would round them. The bytes held are
//!   1.028× the GGUF's for Q4_K (148 per 144), 1.023× for Q5_K, 1× for the
//!   others (plus the padding of a last partial row group).
//!
//! A block's contribution is `d_w·d_x·Σ w_j·x_j + c_w·s_x`, with `s_x = d_x·Σ x_j`
//! and `c_w` = the minimum (Q4_1, Q5_1), `−dmin·m` (Q4_K, Q5_K), or `−z·d_w`
//! for a stored zero `z` (Q4_0: 8, Q5_0: 16, Q8_0: 128). Q6_K (values
//! `d·sc·(q − 32)`, a scale per 16) takes two partial dots per block, each
//! `d·sc·d_x·(Σ q_j·x_j − 32·Σ x_j)` with the activations' per-16 integer sums
//! ([`QActs`] keeps them). The activations of a matrix product are quantized
//! once ([`QActs`]) and shared by the matrices that read the same input
//! (q|k|v, gate|up).
//!
//! Rows: the 32-value formats need rows of a multiple of 32, the K-quants of
//! 256 (GGUF cannot store anything else). llama-quantize writes a tensor whose
//! rows are not a multiple of 256 (Qwen2.5-0.5B's 896) in a fallback type
//! (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), all of which load here natively;
//! F16/BF16 tensors are requantized to Q8_0 by the loader, other types go
//! through candle ([`super::llama`]).
//!
//! Kernels: register tiles of one row group × up to 8 activation rows (AVX-512
//! VNNI; decode is the 1-row tile) or 8 weight rows × up to 4 activation rows
//! (AVX2, `vpmaddubsw`), each weight loaded once per tile, and a scalar
//! reference, picked at run time ([`Kernel::best`]; the environment
//! variable `ANCHORCODER_KERNEL=scalar|avx2|avx512vnni` forces a lower one for
//! comparisons, and caps the attention kernels too: [`Kernel::cap`]). On aarch64, NEON tiles of 8 weight rows × up to 4 activation
//! rows, with the dot-product extension or without (`quant_neon.rs`;
//! `ANCHORCODER_KERNEL=scalar|neon|neondot`). Rows are split over candle's worker pool, the one the rest of
//! the engine uses.

use std::sync::OnceLock;

#[cfg(target_arch = "aarch64")]
#[path = "quant_neon.rs"]
mod neon;
#[cfg(target_arch = "aarch64")]
use neon::{tile_neon, tile_neondot, TILE_NEON};

use anyhow::{bail, Result};
use half::f16;

/// Elements per quantization block of the kernels (and of the 32-value formats).
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// A weight format this module multiplies natively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 4 bits, one scale per block, values `d·(q − 8)`.
    Q4_0,
    /// 4 bits, a scale and a minimum per block, values `d·q + m`.
    Q4_1,
    /// 8 bits, one scale per block, values `d·q`.
    Q8_0,
    /// 5 bits, one scale per block, values `d·(q − 16)`.
    Q5_0,
    /// 5 bits, a scale and a minimum per block, values `d·q + m`.
    Q5_1,
    /// 4 bits in super-blocks of 256: values `d·sc·q − dmin·m` with 6-bit
    /// `sc`, `m` per 32.
    Q4K,
    /// 5 bits, otherwise as Q4_K.
    Q5K,
    /// 6 bits in super-blocks of 256: values `d·sc·(q − 32)` with `i8` `sc` per 16.
    Q6K,
}

const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q8_0: u8 = 2;
const F_Q5_0: u8 = 3;
const F_Q5_1: u8 = 4;
const F_Q4K: u8 = 5;
const F_Q5K: u8 = 6;
const F_Q6K: u8 = 7;

/// Bits above the low nibble of format `F` (its high plane).
const fn high_bits(f: u8) -> usize {
    match f {
        F_Q5_0 | F_Q5_1 | F_Q5K => 1,
        F_Q6K => 2,
        _ => 0,
    }
}

impl Format {
    /// Values of one GGUF block, and its bytes.
    fn gguf_block(self) -> (usize, usize) {
        match self {
            Format::Q4_0 => (QK, 18),
            Format::Q4_1 => (QK, 20),
            Format::Q8_0 => (QK, 34),
            Format::Q5_0 => (QK, 22),
            Format::Q5_1 => (QK, 24),
            Format::Q4K => (QK_K, 144),
            Format::Q5K => (QK_K, 176),
            Format::Q6K => (QK_K, 210),
        }
    }

    fn id(self) -> u8 {
        match self {
            Format::Q4_0 => F_Q4_0,
            Format::Q4_1 => F_Q4_1,
            Format::Q8_0 => F_Q8_0,
            Format::Q5_0 => F_Q5_0,
            Format::Q5_1 => F_Q5_1,
            Format::Q4K => F_Q4K,
            Format::Q5K => F_Q5K,
            Format::Q6K => F_Q6K,
        }
    }

    /// Bits above the low nibble, kept in the high plane.
    fn high_bits(self) -> usize {
        high_bits(self.id())
    }

    /// Whether scales come per super-block of 256 (the K-quants).
    fn is_k(self) -> bool {
        matches!(self, Format::Q4K | Format::Q5K | Format::Q6K)
    }

    /// The stored value that means 0 (`w = d·(q − z)`), 0 for formats with minimums.
    fn zero(self) -> f32 {
        match self {
            Format::Q4_0 => 8.0,
            Format::Q5_0 => 16.0,
            Format::Q8_0 => 128.0,
            Format::Q6K => 32.0,
            _ => 0.0,
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
    /// Per row group and block: `RG × 16` bytes of low nibbles, Q8_0 `RG × 32`
    /// bytes (value + 128); rows padded to a multiple of [`RG`] with zeros.
    qs: Vec<u8>,
    /// Per row group and block, the high plane: `RG × 4` bytes per high bit.
    qh: Vec<u8>,
    /// Scales, `RG` per (row group, block), or per (row group, super-block) for K-quants.
    d: Vec<f16>,
    /// Minimums (Q4_1, Q5_1) or `dmin` (Q4_K, Q5_K), laid out as `d`; else empty.
    m: Vec<f16>,
    /// K-quant sub-block scales: `RG` per (row group, block), Q6_K `2 × RG` (`i8`).
    sc: Vec<u8>,
    /// Q4_K/Q5_K sub-block minimums, laid out as `sc`.
    mn: Vec<u8>,
}

/// Scale and minimum `j` (0–7) of a Q4_K/Q5_K super-block's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

impl QMatrix {
    /// From GGUF block data (`n` rows of `k` values, `k` a multiple of the
    /// format's block: 32, or 256 for the K-quants).
    pub fn from_gguf(format: Format, n: usize, k: usize, raw: &[u8]) -> Result<QMatrix> {
        let (bk, bb) = format.gguf_block();
        if k == 0 || !k.is_multiple_of(bk) {
            bail!("a {format:?} matrix needs rows of a multiple of {bk} values, got {k}");
        }
        let nbg = k / bk;
        if raw.len() != n * nbg * bb {
            bail!("{format:?} data of {} bytes for a {n}×{k} matrix (expected {})", raw.len(), n * nbg * bb);
        }
        let half = |b: &[u8], o: usize| f16::from_le_bytes([b[o], b[o + 1]]);
        let mut w = QMatrix::zeros(format, n, k);
        for (i, blk) in raw.chunks_exact(bb).enumerate() {
            let (r, gb) = (i / nbg, i % nbg);
            match format {
                Format::Q4_0 | Format::Q4_1 | Format::Q8_0 | Format::Q5_0 | Format::Q5_1 => {
                    let si = w.scale_index(r, gb);
                    w.d[si] = half(blk, 0);
                    if matches!(format, Format::Q4_1 | Format::Q5_1) {
                        w.m[si] = half(blk, 2);
                    }
                    let vals: [u8; QK] = match format {
                        Format::Q8_0 => std::array::from_fn(|j| (blk[2 + j] as i8 as i16 + 128) as u8),
                        Format::Q4_0 | Format::Q4_1 => {
                            let qs = &blk[bb - 16..];
                            std::array::from_fn(|j| if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 })
                        }
                        _ => {
                            let qh = u32::from_le_bytes(blk[bb - 20..bb - 16].try_into().unwrap());
                            let qs = &blk[bb - 16..];
                            std::array::from_fn(|j| {
                                let lo = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
                                lo | (((qh >> j) & 1) as u8) << 4
                            })
                        }
                    };
                    w.set_block(r, gb, &vals);
                }
                Format::Q4K | Format::Q5K => {
                    let su = w.super_index(r, gb * 8);
                    w.d[su] = half(blk, 0);
                    w.m[su] = half(blk, 2);
                    let scales = &blk[4..16];
                    let (qh, qs) =
                        if format == Format::Q5K { (&blk[16..48], &blk[48..]) } else { (&[][..], &blk[16..]) };
                    for j in 0..8 {
                        let b = gb * 8 + j;
                        let si = w.scale_index(r, b);
                        (w.sc[si], w.mn[si]) = scale_min_k4(j, scales);
                        let q = &qs[32 * (j / 2)..][..32];
                        let vals: [u8; QK] = std::array::from_fn(|l| {
                            let lo = if j % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 };
                            let hi = if qh.is_empty() { 0 } else { (qh[l] >> j) & 1 };
                            lo | hi << 4
                        });
                        w.set_block(r, b, &vals);
                    }
                }
                Format::Q6K => {
                    let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
                    let su = w.super_index(r, gb * 8);
                    w.d[su] = half(blk, 208);
                    for j in 0..8 {
                        // Values 32j..32j+32: quarter `q` of the 128-value half `h`.
                        let (h, q) = (j / 4, j % 4);
                        let b = gb * 8 + j;
                        for s in 0..2 {
                            let i6 = w.six_index(r, b, s);
                            w.sc[i6] = scales[8 * h + 2 * q + s];
                        }
                        let vals: [u8; QK] = std::array::from_fn(|l| {
                            let byte = ql[64 * h + 32 * (q % 2) + l];
                            let lo = if q < 2 { byte & 0x0F } else { byte >> 4 };
                            lo | ((qh[32 * h + l] >> (2 * q)) & 3) << 4
                        });
                        w.set_block(r, b, &vals);
                    }
                }
            }
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
        let scales = if format.is_k() { np * nb / 8 } else { np * nb };
        let has_min = matches!(format, Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K);
        let (sc, mn) = match format {
            Format::Q4K | Format::Q5K => (np * nb, np * nb),
            Format::Q6K => (2 * np * nb, 0),
            _ => (0, 0),
        };
        QMatrix {
            format,
            n,
            k,
            nb,
            qs: vec![0; q_bytes],
            qh: vec![0; np * nb * 4 * format.high_bits()],
            d: vec![f16::ZERO; scales],
            m: vec![f16::ZERO; if has_min { scales } else { 0 }],
            sc: vec![0; sc],
            mn: vec![0; mn],
        }
    }

    /// Index of row `r`'s block `b` in `d` and `m` (32-value formats) or in
    /// `sc` and `mn` (Q4_K, Q5_K).
    fn scale_index(&self, r: usize, b: usize) -> usize {
        ((r / RG) * self.nb + b) * RG + r % RG
    }

    /// Index of the super-block holding row `r`'s block `b` in `d` and `m` (K-quants).
    fn super_index(&self, r: usize, b: usize) -> usize {
        ((r / RG) * (self.nb / 8) + b / 8) * RG + r % RG
    }

    /// Index of the Q6_K scale of row `r`'s block `b`, half `h` (values `16h..16h+16`).
    fn six_index(&self, r: usize, b: usize, h: usize) -> usize {
        (((r / RG) * self.nb + b) * 2 + h) * RG + r % RG
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

    /// Byte offset and bit shift of element `j`'s high bits in the high plane:
    /// run `t = j / 4` is field `t` of the block's register (1 bit) or field
    /// `t % 4` of register `t / 4` (2 bits).
    fn high_at(&self, r: usize, b: usize, j: usize) -> (usize, u32) {
        let hb = self.format.high_bits();
        let t = j / 4;
        let (reg, field) = if hb == 1 { (0, t) } else { (t / 4, t % 4) };
        ((r / RG * self.nb + b) * RG * 4 * hb + reg * 4 * RG + (r % RG) * 4 + j % 4, (hb * field) as u32)
    }

    /// Store block `b` of row `r` from its 32 unsigned values.
    fn set_block(&mut self, r: usize, b: usize, vals: &[u8; QK]) {
        let hb = self.format.high_bits() as u32;
        for (j, &v) in vals.iter().enumerate() {
            let (o, shift) = self.value_at(r, b, j);
            let mask = 0xFFu8.wrapping_shr(8 - self.width());
            self.qs[o] = self.qs[o] & !(mask << shift) | (v & mask) << shift;
            if hb > 0 {
                let (o, shift) = self.high_at(r, b, j);
                let mask = (1u8 << hb) - 1;
                self.qh[o] = self.qh[o] & !(mask << shift) | ((v >> 4) & mask) << shift;
            }
        }
    }

    /// Bits per value in `qs`.
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
        let hb = self.format.high_bits() as u32;
        std::array::from_fn(|j| {
            let (o, shift) = self.value_at(r, b, j);
            let mut v = (self.qs[o] >> shift) & mask;
            if hb > 0 {
                let (o, shift) = self.high_at(r, b, j);
                v |= ((self.qh[o] >> shift) & ((1 << hb) - 1)) << 4;
            }
            v
        })
    }

    /// Row `r`'s block `b`, half `h` (values `16h..16h+16`): `(scale, zero,
    /// min)` with weights `scale·(q − zero) + min`.
    fn half_params(&self, r: usize, b: usize, h: usize) -> (f32, f32, f32) {
        let z = self.format.zero();
        match self.format {
            Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => (self.d[self.scale_index(r, b)].to_f32(), z, 0.0),
            Format::Q4_1 | Format::Q5_1 => {
                let i = self.scale_index(r, b);
                (self.d[i].to_f32(), z, self.m[i].to_f32())
            }
            Format::Q4K | Format::Q5K => {
                let (s, i) = (self.super_index(r, b), self.scale_index(r, b));
                (self.d[s].to_f32() * self.sc[i] as f32, z, -(self.m[s].to_f32() * self.mn[i] as f32))
            }
            Format::Q6K => {
                let d = self.d[self.super_index(r, b)].to_f32();
                (d * self.sc[self.six_index(r, b, h)] as i8 as f32, z, 0.0)
            }
        }
    }

    /// Row `r` as `f32` values (an embedding lookup), ggml's formulas to the bit.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let vals = self.block(r, b);
            for h in 0..2 {
                let (scale, zero, min) = self.half_params(r, b, h);
                for (o, &v) in o[16 * h..16 * h + 16].iter_mut().zip(&vals[16 * h..]) {
                    *o = scale * (v as f32 - zero) + min;
                }
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

    /// Bytes held (values, high planes, scales, minimums).
    pub fn bytes(&self) -> usize {
        self.qs.len() + self.qh.len() + 2 * (self.d.len() + self.m.len()) + self.sc.len() + self.mn.len()
    }
}

/// Activation rows (`rows × k`) quantized to 8 bits per block of 32, with
/// each block's scale `d` and scaled sum `s = d·Σq` (ggml's Q8_1), and the
/// integer sums of each half block (what Q6_K's per-16 zero needs).
pub struct QActs {
    rows: usize,
    k: usize,
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// `Σq` of values `16h..16h+16` of each block, at `2·block + h`.
    hs: Vec<i32>,
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
        let mut a = QActs {
            rows,
            k,
            nb,
            qs: vec![0; rows * k],
            d: vec![0.0; rows * nb],
            s: vec![0.0; rows * nb],
            hs: vec![0; 2 * rows * nb],
        };
        let ptrs = (
            a.qs.as_mut_ptr() as usize,
            a.d.as_mut_ptr() as usize,
            a.s.as_mut_ptr() as usize,
            a.hs.as_mut_ptr() as usize,
        );
        // The vector version gives the same bytes as `quantize_block` (tests).
        #[cfg(target_arch = "x86_64")]
        let simd = Kernel::best() >= Kernel::Avx2;
        let quantize_rows = |range: std::ops::Range<usize>| {
            for i in range.start * nb..range.end * nb {
                // SAFETY: block `i` lies inside the four buffers (sized above) and
                // every block is written by exactly one range.
                let (q, d, s, hs) = unsafe {
                    (
                        std::slice::from_raw_parts_mut((ptrs.0 as *mut i8).add(i * QK), QK),
                        &mut *(ptrs.1 as *mut f32).add(i),
                        &mut *(ptrs.2 as *mut f32).add(i),
                        &mut *((ptrs.3 as *mut i32).add(2 * i) as *mut [i32; 2]),
                    )
                };
                let xb = &x[i * QK..(i + 1) * QK];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: AVX2/FMA/F16C are there (`simd`); 32 values in, 32 out.
                    (*d, *hs) = unsafe { quantize_block_avx2(xb, q) };
                    *s = *d * (hs[0] + hs[1]) as f32;
                    continue;
                }
                (*d, *hs) = quantize_block(xb, q);
                *s = *d * (hs[0] + hs[1]) as f32;
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

/// One block to `i8` (scale = largest magnitude / 127); returns `d` and the
/// sums of the values of each half.
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, [i32; 2]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut sums = [0i32; 2];
    for (j, (q, x)) in q.iter_mut().zip(x).enumerate() {
        let v = (x * id).round() as i32;
        *q = v as i8;
        sums[j / 16] += v;
    }
    (d, sums)
}

/// [`quantize_block`] in AVX2, bit for bit (finite inputs): the same
/// `x · (1/d)` products, rounded half away from zero as `f32::round` does
/// (`trunc(v ± 0.49999997)`, exact for every `f32`).
///
/// # Safety
/// The CPU has AVX2/FMA/F16C; `x` and `q` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, [i32; 2]) {
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
    // Both halves' sums at once: lanes 0–3 the first half, 4–7 the second.
    let s01 = _mm256_add_epi32(iv[0], iv[1]);
    let s23 = _mm256_add_epi32(iv[2], iv[3]);
    let s = _mm256_hadd_epi32(s01, s23); // per 128-bit lane: [s01 pairs, s23 pairs]
    let s = _mm256_hadd_epi32(s, s); // lane L: [s01 half L, s23 half L, ..]
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let sums = [_mm_cvtsi128_si32(s), _mm_extract_epi32::<1>(s)];
    // Packing interleaves 4-value runs per 128-bit lane; the permute undoes it.
    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
    (d, sums)
}

/// Which dot-product code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Plain Rust: the reference, and what runs without AVX2 or NEON.
    Scalar,
    /// aarch64 NEON (ARMv8.0: `smull`/`smlal`, pairwise widening adds).
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`).
    NeonDot,
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
                Kernel::Neon | Kernel::NeonDot => false,
                Kernel::Avx2 => avx2,
                Kernel::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            match self {
                Kernel::Scalar | Kernel::Neon => true,
                Kernel::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
                _ => false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            self == Kernel::Scalar
        }
    }

    /// The highest kernel `ANCHORCODER_KERNEL` allows (no cap when unset);
    /// the attention kernels honour it too.
    pub fn cap() -> Kernel {
        static CAP: OnceLock<Kernel> = OnceLock::new();
        *CAP.get_or_init(|| match std::env::var("ANCHORCODER_KERNEL").as_deref() {
            Ok("scalar") => Kernel::Scalar,
            Ok("avx2") => Kernel::Avx2,
            Ok("neon") => Kernel::Neon,
            Ok("neondot") => Kernel::NeonDot,
            _ => Kernel::Avx512Vnni,
        })
    }

    /// The fastest available kernel, capped by `ANCHORCODER_KERNEL` if set
    /// (detected once).
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = Kernel::cap();
            // One family runs on a CPU; a cap from the other one is no cap.
            [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::NeonDot, Kernel::Neon, Kernel::Scalar]
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
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon | Kernel::NeonDot => TILE_NEON,
            _ => 1,
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
                Format::Q5_0 => by_rows!($f, F_Q5_0, $($t)*),
                Format::Q5_1 => by_rows!($f, F_Q5_1, $($t)*),
                Format::Q4K => by_rows!($f, F_Q4K, $($t)*),
                Format::Q5K => by_rows!($f, F_Q5K, $($t)*),
                Format::Q6K => by_rows!($f, F_Q6K, $($t)*),
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
        #[cfg(target_arch = "aarch64")]
        Kernel::NeonDot => by_format!(tile_neondot, 1 2 3 4),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => by_format!(tile_neon, 1 2 3 4),
        _ => unreachable!("{kernel:?} does not run on this CPU"),
    }
}

/// The reference: integer dots per block (Q6_K: per half block), then scales.
fn dot_scalar(w: &QMatrix, r: usize, x: &QActs, i: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..w.nb {
        let xi = i * x.nb + b;
        let xq = &x.qs[i * x.k + b * QK..][..QK];
        let q = w.block(r, b);
        let dot = |range: std::ops::Range<usize>| -> i32 { range.map(|j| q[j] as i32 * xq[j] as i32).sum() };
        if w.format == Format::Q6K {
            for h in 0..2 {
                let (scale, zero, _) = w.half_params(r, b, h);
                let t = dot(16 * h..16 * h + 16) - zero as i32 * x.hs[2 * xi + h];
                acc += scale * x.d[xi] * t as f32;
            }
        } else {
            let (scale, zero, min) = w.half_params(r, b, 0);
            acc += scale * x.d[xi] * dot(0..QK) as f32 + (min - zero * scale) * x.s[xi];
        }
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

/// Bit `$bit` of every byte of `$v` moved to bit 4 (bits around it move
/// along; the caller masks): a 16-bit shift left or right.
#[cfg(target_arch = "x86_64")]
macro_rules! to_bit4 {
    ($sll:ident, $srl:ident, $v:expr, $bit:expr) => {{
        let bit: i32 = $bit as i32;
        if bit <= 4 {
            $sll($v, _mm_cvtsi32_si128(4 - bit))
        } else {
            $srl($v, _mm_cvtsi32_si128(bit - 4))
        }
    }};
}

/// Bit of the high plane that holds run `t`'s high bits (fields of 1 bit for
/// Q5, of 2 bits for Q6_K, whose runs 8–15 sit in a second register).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
const fn high_bit_of(hb: usize, t: usize) -> usize {
    if hb == 1 {
        t
    } else {
        2 * (t % 4)
    }
}

/// AVX-512 VNNI register tile: 16 weight rows (one row group) × `R`
/// activation rows. Per block, each `vpdpbusd` multiplies 4 values of the 16
/// rows by 4 activation bytes broadcast to every lane, so a block's dot
/// accumulates whole in `i32` lanes (one per weight row: no horizontal sums,
/// no shuffles); then one convert and two FMAs per tile row apply the block's
/// scales (Q6_K: one per half block). The weights are loaded (and unpacked)
/// once per tile.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; indices as in [`group_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const R: usize, const F: u8>(w: &QMatrix, g: usize, x: &QActs, i0: usize, out: *mut f32) {
    let nb = w.nb;
    let hb = high_bits(F);
    let low4 = _mm512_set1_epi8(0x0F);
    let hmask = _mm512_set1_epi8(if hb == 1 { 0x10 } else { 0x30 });
    let halves = if F == F_Q6K { 2 } else { 1 };
    let half16 = |p: *const f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
    let bytes16 = |p: *const u8| _mm_loadu_si128(p as *const __m128i);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let bi = g * nb + b;
        let sup = (g * (nb / 8) + b / 8) * RG;
        // Scale and sum coefficient of the block, one lane per weight row.
        let (dw, coef) = match F {
            F_Q4_1 | F_Q5_1 => (half16(w.d.as_ptr().add(bi * RG)), half16(w.m.as_ptr().add(bi * RG))),
            F_Q4K | F_Q5K => {
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16(w.sc.as_ptr().add(bi * RG))));
                let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16(w.mn.as_ptr().add(bi * RG))));
                let dmin = half16(w.m.as_ptr().add(sup));
                (
                    _mm512_mul_ps(half16(w.d.as_ptr().add(sup)), sc),
                    _mm512_mul_ps(_mm512_mul_ps(dmin, mn), _mm512_set1_ps(-1.0)),
                )
            }
            F_Q6K => (half16(w.d.as_ptr().add(sup)), _mm512_setzero_ps()),
            _ => {
                let dw = half16(w.d.as_ptr().add(bi * RG));
                let z = match F {
                    F_Q4_0 => -8.0,
                    F_Q5_0 => -16.0,
                    _ => -128.0,
                };
                (dw, _mm512_mul_ps(dw, _mm512_set1_ps(z)))
            }
        };
        let hq = w.qh.as_ptr().add(bi * RG * 4 * hb);
        let qh = [
            if hb > 0 { _mm512_loadu_si512(hq as *const _) } else { _mm512_setzero_si512() },
            if hb == 2 { _mm512_loadu_si512(hq.add(4 * RG) as *const _) } else { _mm512_setzero_si512() },
        ];
        for hf in 0..halves {
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
                let per = 4 / halves;
                for c in hf * per..(hf + 1) * per {
                    let packed = _mm512_loadu_si512(wq.add(c * 4 * RG) as *const _);
                    let mut lo = _mm512_and_si512(packed, low4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low4);
                    if hb > 0 {
                        let reg = qh[if hb == 2 { c / 2 } else { 0 }];
                        let (blo, bhi) = (high_bit_of(hb, 2 * c), high_bit_of(hb, 2 * c + 1));
                        let flo = to_bit4!(_mm512_sll_epi16, _mm512_srl_epi16, reg, blo);
                        let fhi = to_bit4!(_mm512_sll_epi16, _mm512_srl_epi16, reg, bhi);
                        // lo | (flo & hmask) in one instruction (A | (B & C)).
                        lo = _mm512_ternarylogic_epi32::<0xF8>(lo, flo, hmask);
                        hi = _mm512_ternarylogic_epi32::<0xF8>(hi, fhi, hmask);
                    }
                    for (i, d) in dot.iter_mut().enumerate() {
                        let j = b * QK + 8 * c;
                        *d = _mm512_dpbusd_epi32(*d, lo, _mm512_set1_epi32(x4(x, i0 + i, j)));
                        *d = _mm512_dpbusd_epi32(*d, hi, _mm512_set1_epi32(x4(x, i0 + i, j + 4)));
                    }
                }
            }
            if F == F_Q6K {
                let sc = _mm512_cvtepi8_epi32(bytes16(w.sc.as_ptr().add((bi * 2 + hf) * RG)));
                let dsc = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(sc));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xb = (i0 + i) * nb + b;
                    let t = _mm512_sub_epi32(dot[i], _mm512_set1_epi32(32 * *x.hs.get_unchecked(2 * xb + hf)));
                    let scale = _mm512_mul_ps(dsc, _mm512_set1_ps(*x.d.get_unchecked(xb)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, *a);
                }
            } else {
                for (i, a) in acc.iter_mut().enumerate() {
                    let xb = (i0 + i) * nb + b;
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(xb)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), scale, *a);
                    *a = _mm512_fmadd_ps(coef, _mm512_set1_ps(*x.s.get_unchecked(xb)), *a);
                }
            }
        }
    }
    let r0 = g * RG;
    let mask: __mmask16 = (((1u32 << (w.n - r0).min(RG)) - 1) & 0xFFFF) as u16;
    for (i, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add((i0 + i) * w.n + r0), mask, *a);
    }
}

/// AVX2 register tile: 8 weight rows (half a row group) × `R` activation
/// rows, the same scheme as [`tile_vnni`] with `vpmaddubsw`. 4-bit products
/// add up in 16 bits over a whole block (at most 16 · 15 · 128 = 30,720 per
/// lane); 5- and 6-bit ones over 8 values (2 · 2 · 63 · 128 = 32,256), then
/// widen to 32 bits (Q6_K: `vpmaddwd` by the half block's scale instead of
/// by 1, so both halves sum in one integer dot and its zero comes off as
/// `32·Σ sc_h·S_h` in one more `vpmaddwd`); Q8_0 takes the sign trick (its unsigned values would
/// saturate) and widens each product to 32 bits.
///
/// # Safety
/// The CPU has AVX2/FMA/F16C; indices as in [`group_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const F: u8>(w: &QMatrix, g: usize, x: &QActs, i0: usize, out: *mut f32) {
    let nb = w.nb;
    let hb = high_bits(F);
    let (low4, ones, flip) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1), _mm256_set1_epi8(-128));
    let hmask = _mm256_set1_epi8(if hb == 1 { 0x10 } else { 0x30 });
    let half8 = |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let bytes8 = |p: *const u8| _mm_loadl_epi64(p as *const __m128i);
    for h in 0..2 {
        let r0 = g * RG + 8 * h;
        if r0 >= w.n {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let bi = g * nb + b;
            let sup = (g * (nb / 8) + b / 8) * RG + 8 * h;
            let (dw, coef) = match F {
                F_Q4_1 | F_Q5_1 => (half8(w.d.as_ptr().add(bi * RG + 8 * h)), half8(w.m.as_ptr().add(bi * RG + 8 * h))),
                F_Q4K | F_Q5K => {
                    let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8(w.sc.as_ptr().add(bi * RG + 8 * h))));
                    let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8(w.mn.as_ptr().add(bi * RG + 8 * h))));
                    let dmin = half8(w.m.as_ptr().add(sup));
                    (
                        _mm256_mul_ps(half8(w.d.as_ptr().add(sup)), sc),
                        _mm256_mul_ps(_mm256_mul_ps(dmin, mn), _mm256_set1_ps(-1.0)),
                    )
                }
                F_Q6K => (half8(w.d.as_ptr().add(sup)), _mm256_setzero_ps()),
                _ => {
                    let dw = half8(w.d.as_ptr().add(bi * RG + 8 * h));
                    (dw, _mm256_mul_ps(dw, _mm256_set1_ps(if F == F_Q5_0 { -16.0 } else { -8.0 })))
                }
            };
            let hq = w.qh.as_ptr().add(bi * RG * 4 * hb + 32 * h);
            let qh = [
                if hb > 0 { _mm256_loadu_si256(hq as *const __m256i) } else { _mm256_setzero_si256() },
                if hb == 2 { _mm256_loadu_si256(hq.add(4 * RG) as *const __m256i) } else { _mm256_setzero_si256() },
            ];
            // Q6_K: each half block's `i8` scale, in both 16-bit halves of its
            // row's lane (`vpmaddwd` then scales and widens in one step), and
            // the two scales side by side (for the zero's `32·Σ sc_h·S_h`).
            let (sc6, sc_pair) = if F == F_Q6K {
                let s: [__m256i; 2] = std::array::from_fn(|hf| {
                    _mm256_cvtepi8_epi32(bytes8(w.sc.as_ptr().add((bi * 2 + hf) * RG + 8 * h)))
                });
                let low = |v: __m256i| _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
                (
                    [0, 1].map(|hf| _mm256_or_si256(low(s[hf]), _mm256_slli_epi32::<16>(s[hf]))),
                    _mm256_or_si256(low(s[0]), _mm256_slli_epi32::<16>(s[1])),
                )
            } else {
                ([_mm256_setzero_si256(); 2], _mm256_setzero_si256())
            };
            {
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
                    for c in 0..4 {
                        let packed = _mm256_loadu_si256(wq.add(c * 4 * RG) as *const __m256i);
                        let mut lo = _mm256_and_si256(packed, low4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low4);
                        if hb > 0 {
                            let reg = qh[if hb == 2 { c / 2 } else { 0 }];
                            let (blo, bhi) = (high_bit_of(hb, 2 * c), high_bit_of(hb, 2 * c + 1));
                            let flo = to_bit4!(_mm256_sll_epi16, _mm256_srl_epi16, reg, blo);
                            let fhi = to_bit4!(_mm256_sll_epi16, _mm256_srl_epi16, reg, bhi);
                            lo = _mm256_or_si256(lo, _mm256_and_si256(flo, hmask));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(fhi, hmask));
                        }
                        for (i, d) in dot.iter_mut().enumerate() {
                            let j = b * QK + 8 * c;
                            let p = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x4(x, i0 + i, j)));
                            let p =
                                _mm256_add_epi16(p, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x4(x, i0 + i, j + 4))));
                            *d = match hb {
                                0 => _mm256_add_epi16(*d, p),
                                1 => _mm256_add_epi32(*d, _mm256_madd_epi16(p, ones)),
                                _ => _mm256_add_epi32(*d, _mm256_madd_epi16(p, sc6[c / 2])),
                            };
                        }
                    }
                    if hb == 0 {
                        for d in dot.iter_mut() {
                            *d = _mm256_madd_epi16(*d, ones);
                        }
                    }
                }
                if F == F_Q6K {
                    // dot = Σ_h sc_h·Σ q·x already; take 32·Σ_h sc_h·S_h off
                    // (|S_h| <= 16·128 fits 16 bits).
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xb = (i0 + i) * nb + b;
                        let (s0, s1) = (*x.hs.get_unchecked(2 * xb), *x.hs.get_unchecked(2 * xb + 1));
                        let sums = _mm256_set1_epi32((s0 & 0xFFFF) | (s1 << 16));
                        let zero = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc_pair, sums));
                        let t = _mm256_sub_epi32(dot[i], zero);
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xb)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), scale, *a);
                    }
                } else {
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xb = (i0 + i) * nb + b;
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xb)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), scale, *a);
                        if F != F_Q8_0 {
                            *a = _mm256_fmadd_ps(coef, _mm256_set1_ps(*x.s.get_unchecked(xb)), *a);
                        }
                    }
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
    use candle_core::quantized::GgmlDType;
    use candle_core::CpuStorage;

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

    /// Random weights whose magnitude changes every 16 values (so sub-block
    /// scales and minimums differ).
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        random(n, seed).iter().enumerate().map(|(j, v)| v * (0.2 + ((j / 16) * 7 % 11) as f32 / 5.0)).collect()
    }

    fn ggml(format: Format) -> GgmlDType {
        match format {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_1 => GgmlDType::Q4_1,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q5_0 => GgmlDType::Q5_0,
            Format::Q5_1 => GgmlDType::Q5_1,
            Format::Q4K => GgmlDType::Q4K,
            Format::Q5K => GgmlDType::Q5K,
            Format::Q6K => GgmlDType::Q6K,
        }
    }

    /// GGUF blocks of `data` in `format`, quantized by candle (ggml's reference
    /// quantization).
    fn gguf_blocks(format: Format, data: &[f32]) -> Vec<u8> {
        let mut q = ggml(format).cpu_zeros(data.len());
        q.from_float(data);
        // SAFETY: candle's blocks are plain bytes, `storage_size_in_bytes` of them.
        unsafe { std::slice::from_raw_parts(q.as_ptr(), q.storage_size_in_bytes()) }.to_vec()
    }

    /// candle's (ggml's) dequantization of GGUF blocks, independent of our layout.
    fn gguf_dequantize(format: Format, raw: &[u8]) -> Vec<f32> {
        let (bk, bb) = format.gguf_block();
        match ggml(format).from_data(std::borrow::Cow::Borrowed(raw)).dequantize(raw.len() / bb * bk).unwrap() {
            CpuStorage::F32(v) => v,
            _ => unreachable!("dequantized to f32"),
        }
    }

    const FORMATS: [Format; 8] =
        [Format::Q4_0, Format::Q4_1, Format::Q8_0, Format::Q5_0, Format::Q5_1, Format::Q4K, Format::Q5K, Format::Q6K];

    /// Row widths to test: several blocks, odd counts, for the format's block.
    fn widths(format: Format) -> &'static [usize] {
        if format.is_k() {
            &[256, 512, 768, 1536]
        } else {
            &[32, 96, 544, 576, 1536]
        }
    }

    /// Every kernel; the tests run those [`Kernel::available`] on this CPU.
    const KERNELS: [Kernel; 5] = [Kernel::Scalar, Kernel::Neon, Kernel::NeonDot, Kernel::Avx2, Kernel::Avx512Vnni];

    #[test]
    fn layout_round_trips_gguf_blocks() {
        for format in FORMATS {
            for &k in widths(format) {
                for n in [3, 5, 16, 37, 48] {
                    let raw = gguf_blocks(format, &weights(n * k, (n * k) as u64));
                    let w = QMatrix::from_gguf(format, n, k, &raw).unwrap();
                    assert_eq!(w.dequantize(), gguf_dequantize(format, &raw), "{format:?} {n}×{k}");
                    // Bytes: the GGUF's, plus Q4_K/Q5_K's sub-block scales
                    // as whole bytes (4 per 256 values); a last partial row
                    // group is padded.
                    let extra = if matches!(format, Format::Q4K | Format::Q5K) { 4 * k / QK_K } else { 0 };
                    let padded = (raw.len() / n + extra) * n.next_multiple_of(RG);
                    assert_eq!(w.bytes(), padded, "{format:?} {n}×{k}");
                    let ratio = w.bytes() as f64 / raw.len() as f64;
                    if n.is_multiple_of(RG) {
                        assert!(ratio <= 1.03, "{format:?} {n}×{k}: {ratio}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::from_gguf(Format::Q4_1, 2, 48, &[0; 60]).is_err());
        assert!(QMatrix::from_gguf(Format::Q4_1, 2, 64, &[0; 79]).is_err());
        assert!(QMatrix::from_gguf(Format::Q5_0, 1, 64, &[0; 43]).is_err());
        assert!(QMatrix::quantize_q8_0(&[0.0; 40], 1, 40).is_err());
        // K-quant rows are whole super-blocks (GGUF cannot hold anything else).
        let e = QMatrix::from_gguf(Format::Q4K, 1, 288, &[0; 162]).err().unwrap().to_string();
        assert!(e.contains("multiple of 256"), "{e}");
        assert!(QMatrix::from_gguf(Format::Q6K, 2, 256, &[0; 419]).is_err());
        assert!(QMatrix::from_gguf(Format::Q5K, 0, 0, &[]).is_err());
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
            let half = |h: usize| -> i32 { a.qs[b * QK + 16 * h..][..16].iter().map(|&q| q as i32).sum() };
            assert_eq!(a.hs[2 * b..2 * b + 2], [half(0), half(1)]);
            assert!((a.s[b] - a.d[b] * (half(0) + half(1)) as f32).abs() < 1e-5);
        }
    }

    /// Every kernel equals the scalar reference, and all approximate the
    /// `f32` product of the dequantized weights, on awkward shapes: odd block
    /// counts (a lone last block), weight rows not a multiple of the row group,
    /// activation rows from 1 to several tiles, not a multiple of either tile.
    #[test]
    fn kernels_match_reference_and_f32() {
        let kernels: Vec<Kernel> = KERNELS.into_iter().filter(|k| k.available()).collect();
        for format in FORMATS {
            let shapes: &[(usize, usize, usize)] = if format.is_k() {
                &[
                    (1, 37, 256),
                    (3, 19, 1536),
                    (7, 33, 768),
                    (2, 40, 512),
                    (8, 16, 256),
                    (9, 37, 512),
                    (13, 48, 768),
                    (4, 7, 256),
                ]
            } else {
                &[
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
                ]
            };
            for &(m, n, k) in shapes {
                let raw = gguf_blocks(format, &weights(n * k, n as u64));
                let w = QMatrix::from_gguf(format, n, k, &raw).unwrap();
                let mut x = random(m * k, k as u64 + 1);
                // Some activation blocks at the extremes of the `i8` range.
                x[..QK].iter_mut().for_each(|v| *v = if *v < 0.0 { -1.0 } else { 1.0 });
                let a = QActs::quantize(&x, k);
                let wf = gguf_dequantize(format, &raw);
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
    #[cfg(target_arch = "x86_64")]
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
            assert_eq!((got.0.to_bits(), got.1, b), (want.0.to_bits(), want.1, a), "{xb:?}");
        }
    }

    #[test]
    fn q8_0_quantization_matches_gguf() {
        let data = random(4 * 64, 5);
        let w = QMatrix::quantize_q8_0(&data, 4, 64).unwrap();
        let raw = gguf_blocks(Format::Q8_0, &data);
        assert_eq!(w.dequantize(), gguf_dequantize(Format::Q8_0, &raw));
    }

    /// A GGUF mixed as llama-quantize's Q4_K_M/Q5_K_M write them loads every
    /// quantized tensor natively, at the bytes above (Q4_K, Q5_K: +4 per 256
    /// values; others as stored), rows of 288 (not a multiple of 256) in the
    /// fallback types Q5_0/Q5_1, an F16 tensor as Q8_0; and it computes what
    /// its weights say: logits next to the same file with every tensor
    /// dequantized to `f32` (candle's `f32` matmul, no activation rounding).
    /// The only difference left is the 8-bit activations (a relative error of
    /// about 1/254 per value per product, a few products deep): within 3% of
    /// the logits' range, and the same top token wherever the reference's
    /// margin is larger than that.
    #[test]
    fn a_k_quant_mix_loads_natively_and_computes_what_its_weights_say() {
        use crate::engine::llama::{Llama, Logits};
        use crate::engine::policy::AttentionPolicy;
        use candle_core::quantized::{gguf_file, QTensor};
        use candle_core::{Device, Tensor};
        let (hidden, ffn, vocab, heads, kv_heads, layers) = (256usize, 288usize, 64usize, 4u32, 2u32, 2usize);
        let kv = hidden / heads as usize * kv_heads as usize;
        let mut specs: Vec<(String, usize, usize, GgmlDType)> = vec![
            ("token_embd.weight".into(), vocab, hidden, GgmlDType::Q4K),
            ("output.weight".into(), vocab, hidden, GgmlDType::Q6K),
        ];
        for l in 0..layers {
            let t = |n: &str| format!("blk.{l}.{n}.weight");
            specs.extend([
                (t("attn_q"), hidden, hidden, GgmlDType::Q4K),
                (t("attn_k"), kv, hidden, GgmlDType::Q5K),
                (t("attn_v"), kv, hidden, GgmlDType::Q6K),
                (t("attn_output"), hidden, hidden, if l == 0 { GgmlDType::Q8_0 } else { GgmlDType::F16 }),
                (t("ffn_gate"), ffn, hidden, GgmlDType::Q4K),
                (t("ffn_up"), ffn, hidden, if l == 0 { GgmlDType::Q5K } else { GgmlDType::Q6K }),
                (t("ffn_down"), hidden, ffn, if l == 0 { GgmlDType::Q5_0 } else { GgmlDType::Q5_1 }),
            ]);
        }
        let mut quantized: Vec<(String, QTensor)> = Vec::new();
        let mut exact: Vec<(String, QTensor)> = Vec::new();
        let mut want_bytes = 0;
        for (i, (name, n, k, dtype)) in specs.iter().enumerate() {
            let scale = if name.starts_with("token_embd") { 1.0 } else { 1.5 / (*k as f32).sqrt() };
            let v: Vec<f32> = weights(n * k, i as u64 + 11).iter().map(|x| x * scale).collect();
            let q = QTensor::quantize(&Tensor::from_vec(v, (*n, *k), &Device::Cpu).unwrap(), *dtype).unwrap();
            let f = q.dequantize(&Device::Cpu).unwrap();
            want_bytes += match dtype {
                GgmlDType::Q4K | GgmlDType::Q5K => q.storage_size_in_bytes() + n * k / QK_K * 4,
                GgmlDType::F16 => n * k / QK * 34,
                _ => q.storage_size_in_bytes(),
            };
            exact.push((name.clone(), QTensor::quantize(&f, GgmlDType::F32).unwrap()));
            quantized.push((name.clone(), q));
        }
        for l in 0..layers {
            for n in ["attn_norm", "ffn_norm"] {
                let t = Tensor::ones(hidden, candle_core::DType::F32, &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
                quantized.push((format!("blk.{l}.{n}.weight"), q));
                exact.push((format!("blk.{l}.{n}.weight"), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
            }
        }
        let t = Tensor::ones(hidden, candle_core::DType::F32, &Device::Cpu).unwrap();
        quantized.push(("output_norm.weight".into(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        exact.push(("output_norm.weight".into(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        use gguf_file::Value as V;
        let md = [
            ("general.architecture", V::String("llama".into())),
            ("llama.block_count", V::U32(layers as u32)),
            ("llama.embedding_length", V::U32(hidden as u32)),
            ("llama.feed_forward_length", V::U32(ffn as u32)),
            ("llama.attention.head_count", V::U32(heads)),
            ("llama.attention.head_count_kv", V::U32(kv_heads)),
            ("llama.context_length", V::U32(512)),
            ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ];
        let load = |tensors: &[(String, QTensor)], tag: &str| {
            let path = std::env::temp_dir().join(format!("anchorcoder-kmix-{tag}-{}.gguf", std::process::id()));
            let mut f = std::fs::File::create(&path).unwrap();
            let md: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
            let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            gguf_file::write(&mut f, &md, &ts).unwrap();
            drop(f);
            let m = Llama::from_gguf(&path).unwrap().0;
            let _ = std::fs::remove_file(&path);
            m
        };
        let (native, reference) = (load(&quantized, "q"), load(&exact, "f32"));
        assert_eq!(native.weight_bytes(), want_bytes);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 13 + 5) % vocab as u32).collect();
        let anchors = vec![false; tokens.len()];
        let logits =
            |m: &Llama| m.forward(&tokens, &anchors, &mut m.new_cache(AttentionPolicy::full()), Logits::All).unwrap();
        let (got, want) = (logits(&native), logits(&reference));
        let mut worst = 0f32;
        for (p, (g, w)) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)).enumerate() {
            let range = w.iter().fold(f32::MIN, |a, &b| a.max(b)) - w.iter().fold(f32::MAX, |a, &b| a.min(b));
            let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff <= 0.03 * range, "position {p}: logits differ by {diff} (range {range})");
            worst = worst.max(diff / range);
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
            if w[order[0]] - w[order[1]] > 2.0 * diff {
                let top = g.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
                assert_eq!(top, order[0], "position {p}");
            }
        }
        eprintln!("K-quant mix: largest logit difference {:.2}% of the logits' range", 100.0 * worst);
    }

    /// A speed check, not a test: a matrix of Qwen2.5-Coder-1.5B's FFN shape
    /// (8,960 × 1,536) at decode (1 row) and a prefill chunk (64 rows), our
    /// kernel in each format against our Q4_1 and candle's own K-quant matmul
    /// on the same GGUF bytes (activation quantization included on both
    /// sides). Prints ratios, asserts nothing about time. Run with
    /// `cargo test --release -p anchorcoder --lib speed_of_weight_formats -- --ignored --nocapture`.
    #[test]
    #[ignore = "a speed check; run by hand in release"]
    fn speed_of_weight_formats() {
        let (n, k) = (8960, 1536);
        let data = weights(n * k, 7);
        // Candidates measured in turns, the best of 7 turns each, so that the
        // other load on the machine hits all of them alike.
        let best_of = |fs: &mut [Box<dyn FnMut() + '_>]| -> Vec<f64> {
            let mut best = vec![f64::MAX; fs.len()];
            for _ in 0..7 {
                for (f, b) in fs.iter_mut().zip(&mut best) {
                    f();
                    let (t, mut reps) = (std::time::Instant::now(), 0);
                    while t.elapsed().as_secs_f64() < 0.05 {
                        f();
                        reps += 1;
                    }
                    *b = b.min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            best
        };
        let formats = [Format::Q4_1, Format::Q4_0, Format::Q8_0, Format::Q5_0, Format::Q4K, Format::Q5K, Format::Q6K];
        let raws: Vec<Vec<u8>> = formats.iter().map(|&f| gguf_blocks(f, &data)).collect();
        let ours: Vec<QMatrix> =
            formats.iter().zip(&raws).map(|(&f, raw)| QMatrix::from_gguf(f, n, k, raw).unwrap()).collect();
        let theirs: Vec<_> = formats
            .iter()
            .zip(&raws)
            .filter(|(f, _)| f.is_k())
            .map(|(&f, raw)| ggml(f).from_data(std::borrow::Cow::Borrowed(raw)))
            .collect();
        for m in [1, 64] {
            let x = random(m * k, 3);
            let mut fs: Vec<Box<dyn FnMut() + '_>> = Vec::new();
            for w in &ours {
                let x = &x;
                fs.push(Box::new(move || {
                    std::hint::black_box(matmul(&[w], &QActs::quantize(x, k)));
                }));
            }
            for c in &theirs {
                let (x, mut out) = (&x, vec![0f32; m * n]);
                fs.push(Box::new(move || c.matmul_t((m, k, n), x, &mut out).unwrap()));
            }
            let t = best_of(&mut fs);
            println!("{n}×{k} weights × {m} rows, kernel {:?} (time per product, ratio to our Q4_1):", Kernel::best());
            let mut candle = t[formats.len()..].iter();
            for (i, format) in formats.iter().enumerate() {
                let line = format!("  {format:?}: ours {:8.1} µs ({:.2}× Q4_1)", t[i] * 1e6, t[i] / t[0]);
                match format.is_k().then(|| candle.next()).flatten() {
                    Some(c) => println!("{line}; candle {:8.1} µs (ours {:.2}× faster)", c * 1e6, c / t[i]),
                    None => println!("{line}"),
                }
            }
        }
    }
}
