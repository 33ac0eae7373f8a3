//! NEON kernels for aarch64 (a child of [`super`], which documents the
//! weight layout): the same 16-row interleaved groups the x86 kernels stream,
//! no layout of their own.
//!
//! A 128-bit register holds 4 `i32` lanes, so a row group is four registers
//! of 4 weight rows. A tile is 8 weight rows (half a row group, two such
//! registers) × up to [`TILE_NEON`] activation rows: each 16-byte load of
//! weights is one 4-value run of 4 rows (row `ρ` at bytes `4ρ..4ρ+4`), the
//! 32 activation bytes of a block sit in two registers per activation row,
//! and
//!
//! - [`tile_neondot`] (the dot-product extension, run-time detected) adds a
//!   run's 4 products to each row's lane with one `sdot` by element
//!   (`sdot v.4s, w.16b, x.4b[lane]`: the lane picks the 4 activation bytes,
//!   no broadcast needed);
//! - [`tile_neon`] (plain ARMv8.0 NEON) broadcasts those 4 bytes (`dup` by
//!   lane) and multiplies widening to 16 bits: Q4 multiply-adds its products
//!   in 16 bits over a whole block (`smlal`, `smlal2`; at most 8 · 15 · 127 =
//!   15,240 per lane) and pairs them to 32 bits once per block (`saddlp`);
//!   Q8_0 (`smull`, `smull2`) pairs every run into 32 bits (`sadalp`). Two
//!   pairwise adds (`addp`) per block give one lane per row.
//!
//! Q5_0, Q5_1, Q5_K and Q6_K put their high plane's bits at bit 4 with a
//! per-byte shift (`vshlq_u8` by a constant: no bits leak between bytes)
//! and an OR; 16-bit sums stay in range over a block for 5 bits (8 · 31 ·
//! 127 = 31,496 per lane) and over a half block for Q6_K (4 · 63 · 127 =
//! 32,004), whose two halves (a scale per 16 values) are applied one at a
//! time, as in the AVX-512 kernel.
//!
//! Both multiply signed bytes: stored values (0–63) are non-negative as they
//! are; Q8_0's stored `q + 128` becomes `q` again by flipping the top bit,
//! so its block-sum term drops out (as in the AVX2 kernel). Scales: `f16` →
//! `f32` with `fcvtl` (base ARMv8 AdvSIMD; Rust's intrinsic for it needs the
//! unstable `f16` type, so it is written as `asm!`, as `sdot` is: its
//! intrinsics are unstable too), then `fmla` per block as the x86 kernels do.

use std::arch::aarch64::*;
use std::arch::asm;

use half::f16;

use super::{high_bits, QActs, QMatrix, F_Q4K, F_Q4_1, F_Q5K, F_Q5_0, F_Q5_1, F_Q6K, F_Q8_0, QK, RG};

/// Activation rows per tile of the NEON kernels (8 + 8 `f32` accumulators
/// for 8 weight rows, the rest of the 32 registers for weights, activations
/// and the integer dots).
pub(super) const TILE_NEON: usize = 4;

/// Four `f16` (at `p`) as `f32`.
#[inline(always)]
unsafe fn f16x4(p: *const f16) -> float32x4_t {
    let v = vld1_u16(p as *const u16);
    let o: float32x4_t;
    // SAFETY: `fcvtl` (half to single, 4 lanes) is in every ARMv8 NEON; registers only.
    asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) o, in(vreg) v, options(pure, nomem, nostack, preserves_flags));
    o
}

/// Eight bytes at `p` as two registers of `f32`, unsigned or signed (`i8`).
#[inline(always)]
unsafe fn bytes8(p: *const u8, signed: bool) -> [float32x4_t; 2] {
    if signed {
        let v = vmovl_s8(vld1_s8(p as *const i8));
        [vcvtq_f32_s32(vmovl_s16(vget_low_s16(v))), vcvtq_f32_s32(vmovl_high_s16(v))]
    } else {
        let v = vmovl_u8(vld1_u8(p));
        [vcvtq_f32_u32(vmovl_u16(vget_low_u16(v))), vcvtq_f32_u32(vmovl_high_u16(v))]
    }
}

/// `acc += ` 4 products per lane: weight bytes `4ρ..4ρ+4` of `$w` times
/// activation bytes `4L..4L+4` of `$x` (`sdot` by element).
macro_rules! sdot {
    ($acc:expr, $w:expr, $x:expr, $lane:literal) => {
        asm!(
            concat!("sdot {0:v}.4s, {1:v}.16b, {2:v}.4b[", $lane, "]"),
            inout(vreg) $acc,
            in(vreg) $w,
            in(vreg) $x,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
}

/// Per-block scales of rows `8h..8h + 8` of row group `g`, block `b`: `d_w`
/// and the block-sum coefficient `c_w` (unused for Q8_0 and Q6_K), two
/// registers each. K-quants: `d·sc` and `−dmin·m` (Q6_K: `d`, its `i8`
/// scales come per half block in [`apply_q6k`]).
#[inline(always)]
unsafe fn block_scales<const F: u8>(w: &QMatrix, g: usize, b: usize, h: usize) -> ([float32x4_t; 2], [float32x4_t; 2]) {
    let nb = w.nb;
    let p = (g * nb + b) * RG + 8 * h;
    let sup = (g * (nb / 8) + b / 8) * RG + 8 * h;
    let half = |v: &[f16], i: usize| [f16x4(v.as_ptr().add(i)), f16x4(v.as_ptr().add(i + 4))];
    match F {
        F_Q4_1 | F_Q5_1 => (half(&w.d, p), half(&w.m, p)),
        F_Q4K | F_Q5K => {
            let (d, dmin) = (half(&w.d, sup), half(&w.m, sup));
            let (sc, mn) = (bytes8(w.sc.as_ptr().add(p), false), bytes8(w.mn.as_ptr().add(p), false));
            (
                [vmulq_f32(d[0], sc[0]), vmulq_f32(d[1], sc[1])],
                [vnegq_f32(vmulq_f32(dmin[0], mn[0])), vnegq_f32(vmulq_f32(dmin[1], mn[1]))],
            )
        }
        F_Q6K => (half(&w.d, sup), [vdupq_n_f32(0.0); 2]),
        _ => {
            let dw = half(&w.d, p);
            let z = if F == F_Q5_0 { -16.0 } else { -8.0 };
            (dw, [vmulq_n_f32(dw[0], z), vmulq_n_f32(dw[1], z)])
        }
    }
}

/// The two activation registers (elements 0–15, 16–31) of row `i`'s block `b`.
#[inline(always)]
unsafe fn acts(x: &QActs, i: usize, b: usize) -> [int8x16_t; 2] {
    let p = x.qs.as_ptr().add(i * x.k + b * QK);
    [vld1q_s8(p), vld1q_s8(p.add(16))]
}

/// Applies one block's scales to its integer dots (`acc += d_w·d_x·dot + c_w·s_x`).
#[inline(always)]
unsafe fn apply<const R: usize, const F: u8>(
    acc: &mut [[float32x4_t; 2]; R],
    dot: &[[int32x4_t; 2]; R],
    (dw, coef): ([float32x4_t; 2], [float32x4_t; 2]),
    x: &QActs,
    i0: usize,
    b: usize,
) {
    for i in 0..R {
        let xb = (i0 + i) * x.nb + b;
        let (dx, sx) = (*x.d.get_unchecked(xb), *x.s.get_unchecked(xb));
        for q in 0..2 {
            acc[i][q] = vfmaq_f32(acc[i][q], vcvtq_f32_s32(dot[i][q]), vmulq_n_f32(dw[q], dx));
            if F != F_Q8_0 {
                acc[i][q] = vfmaq_n_f32(acc[i][q], coef[q], sx);
            }
        }
    }
}

/// Applies Q6_K's half block `hf` (values `16hf..16hf + 16`):
/// `acc += d·sc_hf·d_x·(dot − 32·S_hf)`.
#[inline(always)]
unsafe fn apply_q6k<const R: usize>(
    acc: &mut [[float32x4_t; 2]; R],
    dot: &[[int32x4_t; 2]; R],
    d: [float32x4_t; 2],
    w: &QMatrix,
    (g, b, h, hf): (usize, usize, usize, usize),
    x: &QActs,
    i0: usize,
) {
    let bi = g * w.nb + b;
    let sc = bytes8(w.sc.as_ptr().add((bi * 2 + hf) * RG + 8 * h), true);
    let dsc = [vmulq_f32(d[0], sc[0]), vmulq_f32(d[1], sc[1])];
    for i in 0..R {
        let xb = (i0 + i) * x.nb + b;
        let dx = *x.d.get_unchecked(xb);
        let zero = vdupq_n_s32(32 * *x.hs.get_unchecked(2 * xb + hf));
        for q in 0..2 {
            let t = vcvtq_f32_s32(vsubq_s32(dot[i][q], zero));
            acc[i][q] = vfmaq_f32(acc[i][q], t, vmulq_n_f32(dsc[q], dx));
        }
    }
}

/// Stores rows `r0..r0 + 8` (those below `w.n`) of the tile's outputs.
#[inline(always)]
unsafe fn store<const R: usize>(acc: &[[float32x4_t; 2]; R], w: &QMatrix, r0: usize, i0: usize, out: *mut f32) {
    let rows = (w.n - r0).min(8);
    for (i, a) in acc.iter().enumerate() {
        let mut buf = [0f32; 8];
        vst1q_f32(buf.as_mut_ptr(), a[0]);
        vst1q_f32(buf.as_mut_ptr().add(4), a[1]);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), out.add((i0 + i) * w.n + r0), rows);
    }
}

/// Weights of (row group, block) `bi`, rows `8h..8h + 8`: the two 16-byte
/// registers of chunk `c` (Q4/Q5/Q6 low nibbles: 64-byte chunks of two runs;
/// Q8_0: one run).
#[inline(always)]
unsafe fn wregs(w: &QMatrix, bi: usize, h: usize, c: usize, q8: bool) -> [uint8x16_t; 2] {
    let p = if q8 { w.qs.as_ptr().add(bi * RG * QK) } else { w.qs.as_ptr().add(bi * RG * 16) };
    let p = p.add(c * 4 * RG + 32 * h);
    [vld1q_u8(p), vld1q_u8(p.add(16))]
}

/// The high plane of (row group, block) `bi`, rows `8h..8h + 8`: register 0
/// (Q5: every run's bit; Q6_K: runs 0–3) and 1 (Q6_K: runs 4–7), two 16-byte
/// halves each; zeros for formats without high bits.
#[inline(always)]
unsafe fn high_plane<const F: u8>(w: &QMatrix, bi: usize, h: usize) -> [[uint8x16_t; 2]; 2] {
    let hb = high_bits(F);
    let mut r = [[vdupq_n_u8(0); 2]; 2];
    for (reg, v) in r.iter_mut().enumerate().take(hb) {
        let p = w.qh.as_ptr().add(bi * RG * 4 * hb + reg * 4 * RG + 32 * h);
        *v = [vld1q_u8(p), vld1q_u8(p.add(16))];
    }
    r
}

/// Chunk `c` of a block (runs `2c`, `2c + 1`) as signed bytes, rows `8h..8h
/// + 8` in two registers each: the low nibbles, with the high plane's bits
/// (of `qh`, from [`high_plane`]) moved to bit 4 and up.
#[inline(always)]
unsafe fn unpack<const F: u8>(
    w: &QMatrix,
    bi: usize,
    h: usize,
    c: usize,
    qh: &[[uint8x16_t; 2]; 2],
) -> [[int8x16_t; 2]; 2] {
    let hb = high_bits(F);
    let low4 = vdupq_n_u8(0x0F);
    let wv = wregs(w, bi, h, c, false);
    let mut v = [[vandq_u8(wv[0], low4), vandq_u8(wv[1], low4)], [vshrq_n_u8::<4>(wv[0]), vshrq_n_u8::<4>(wv[1])]];
    if hb > 0 {
        let hmask = vdupq_n_u8(if hb == 1 { 0x10 } else { 0x30 });
        for (e, v) in v.iter_mut().enumerate() {
            // Run t's field: bit t of register 0 (Q5), bits 2(t % 4).. of register t / 4 (Q6_K).
            let t = 2 * c + e;
            let (reg, bit) = if hb == 1 { (0, t) } else { (t / 4, 2 * (t % 4)) };
            let shift = vdupq_n_s8(4 - bit as i8);
            for q in 0..2 {
                v[q] = vorrq_u8(v[q], vandq_u8(vshlq_u8(qh[reg][q], shift), hmask));
            }
        }
    }
    v.map(|v| [vreinterpretq_s8_u8(v[0]), vreinterpretq_s8_u8(v[1])])
}

/// Dot-product-extension tile: 8 weight rows (half of row group `g`) × `R`
/// activation rows from `i0`, written to `out` (`x.rows × w.n`).
///
/// # Safety
/// The CPU has `dotprod`; indices as in `super::group_tile`, `R <= TILE_NEON`.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn tile_neondot<const R: usize, const F: u8>(
    w: &QMatrix,
    g: usize,
    x: &QActs,
    i0: usize,
    out: *mut f32,
) {
    let nb = w.nb;
    let flip = vdupq_n_u8(0x80);
    for h in 0..2 {
        let r0 = g * RG + 8 * h;
        if r0 >= w.n {
            break;
        }
        let mut acc = [[vdupq_n_f32(0.0); 2]; R];
        for b in 0..nb {
            let bi = g * nb + b;
            let scales = block_scales::<F>(w, g, b, h);
            let xs: [[int8x16_t; 2]; R] = std::array::from_fn(|i| acts(x, i0 + i, b));
            let mut dot = [[vdupq_n_s32(0); 2]; R];
            if F == F_Q8_0 {
                // Elements 4·run.. of the block: activation register run / 4, lane run % 4.
                macro_rules! q8_run {
                    ($run:literal, $reg:literal, $lane:literal) => {
                        let wv = wregs(w, bi, h, $run, true);
                        let ws =
                            [vreinterpretq_s8_u8(veorq_u8(wv[0], flip)), vreinterpretq_s8_u8(veorq_u8(wv[1], flip))];
                        for i in 0..R {
                            for q in 0..2 {
                                sdot!(dot[i][q], ws[q], xs[i][$reg], $lane);
                            }
                        }
                    };
                }
                q8_run!(0, 0, 0);
                q8_run!(1, 0, 1);
                q8_run!(2, 0, 2);
                q8_run!(3, 0, 3);
                q8_run!(4, 1, 0);
                q8_run!(5, 1, 1);
                q8_run!(6, 1, 2);
                q8_run!(7, 1, 3);
                apply::<R, F>(&mut acc, &dot, scales, x, i0, b);
                continue;
            }
            let qh = high_plane::<F>(w, bi, h);
            // Chunk c: low nibbles are run 2c, high nibbles run 2c + 1.
            macro_rules! chunk {
                ($c:literal, $reg:literal, $lo:literal, $hi:literal) => {
                    let [lo, hi] = unpack::<F>(w, bi, h, $c, &qh);
                    for i in 0..R {
                        for q in 0..2 {
                            sdot!(dot[i][q], lo[q], xs[i][$reg], $lo);
                            sdot!(dot[i][q], hi[q], xs[i][$reg], $hi);
                        }
                    }
                };
            }
            chunk!(0, 0, 0, 1);
            chunk!(1, 0, 2, 3);
            if F == F_Q6K {
                apply_q6k::<R>(&mut acc, &dot, scales.0, w, (g, b, h, 0), x, i0);
                dot = [[vdupq_n_s32(0); 2]; R];
            }
            chunk!(2, 1, 0, 1);
            chunk!(3, 1, 2, 3);
            if F == F_Q6K {
                apply_q6k::<R>(&mut acc, &dot, scales.0, w, (g, b, h, 1), x, i0);
            } else {
                apply::<R, F>(&mut acc, &dot, scales, x, i0, b);
            }
        }
        store(&acc, w, r0, i0, out);
    }
}

/// Four activation bytes (lane `L` of `x`) in every 32-bit lane.
#[inline(always)]
unsafe fn bcast<const L: i32>(x: int8x16_t) -> int8x16_t {
    vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(x)))
}

/// Plain-NEON tile (no dot-product extension): as [`tile_neondot`], products
/// widened with `smull`/`smlal` and summed pairwise (`saddlp`/`sadalp`, `addp`).
///
/// # Safety
/// Indices as in `super::group_tile`, `R <= TILE_NEON`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn tile_neon<const R: usize, const F: u8>(
    w: &QMatrix,
    g: usize,
    x: &QActs,
    i0: usize,
    out: *mut f32,
) {
    let nb = w.nb;
    let flip = vdupq_n_u8(0x80);
    for h in 0..2 {
        let r0 = g * RG + 8 * h;
        if r0 >= w.n {
            break;
        }
        let mut acc = [[vdupq_n_f32(0.0); 2]; R];
        for b in 0..nb {
            let bi = g * nb + b;
            let scales = block_scales::<F>(w, g, b, h);
            let xs: [[int8x16_t; 2]; R] = std::array::from_fn(|i| acts(x, i0 + i, b));
            // Per activation row and 4-row register: rows 0–1 and rows 2–3 of
            // the register, each lane pair one row (16-bit for Q4/Q5/Q6, 32-bit for Q8_0).
            let mut dot = [[vdupq_n_s32(0); 2]; R];
            if F == F_Q8_0 {
                let mut pairs = [[[vdupq_n_s32(0); 2]; 2]; R];
                macro_rules! q8_run {
                    ($run:literal, $reg:literal, $lane:literal) => {
                        let wv = wregs(w, bi, h, $run, true);
                        let ws =
                            [vreinterpretq_s8_u8(veorq_u8(wv[0], flip)), vreinterpretq_s8_u8(veorq_u8(wv[1], flip))];
                        for i in 0..R {
                            let xb = bcast::<$lane>(xs[i][$reg]);
                            for q in 0..2 {
                                let p = &mut pairs[i][q];
                                p[0] = vpadalq_s16(p[0], vmull_s8(vget_low_s8(ws[q]), vget_low_s8(xb)));
                                p[1] = vpadalq_s16(p[1], vmull_high_s8(ws[q], xb));
                            }
                        }
                    };
                }
                q8_run!(0, 0, 0);
                q8_run!(1, 0, 1);
                q8_run!(2, 0, 2);
                q8_run!(3, 0, 3);
                q8_run!(4, 1, 0);
                q8_run!(5, 1, 1);
                q8_run!(6, 1, 2);
                q8_run!(7, 1, 3);
                for i in 0..R {
                    for q in 0..2 {
                        dot[i][q] = vpaddq_s32(pairs[i][q][0], pairs[i][q][1]);
                    }
                }
                apply::<R, F>(&mut acc, &dot, scales, x, i0, b);
                continue;
            }
            let qh = high_plane::<F>(w, bi, h);
            let mut sums = [[[vdupq_n_s16(0); 2]; 2]; R];
            macro_rules! chunk {
                ($c:literal, $reg:literal, $lo:literal, $hi:literal) => {
                    let [lo, hi] = unpack::<F>(w, bi, h, $c, &qh);
                    for i in 0..R {
                        let (xl, xh) = (bcast::<$lo>(xs[i][$reg]), bcast::<$hi>(xs[i][$reg]));
                        for q in 0..2 {
                            let s = &mut sums[i][q];
                            s[0] = vmlal_s8(s[0], vget_low_s8(lo[q]), vget_low_s8(xl));
                            s[0] = vmlal_s8(s[0], vget_low_s8(hi[q]), vget_low_s8(xh));
                            s[1] = vmlal_high_s8(s[1], lo[q], xl);
                            s[1] = vmlal_high_s8(s[1], hi[q], xh);
                        }
                    }
                };
            }
            // The 16-bit sums to one `i32` lane per row.
            macro_rules! widen {
                () => {
                    for i in 0..R {
                        for q in 0..2 {
                            dot[i][q] = vpaddq_s32(vpaddlq_s16(sums[i][q][0]), vpaddlq_s16(sums[i][q][1]));
                        }
                    }
                };
            }
            chunk!(0, 0, 0, 1);
            chunk!(1, 0, 2, 3);
            if F == F_Q6K {
                widen!();
                apply_q6k::<R>(&mut acc, &dot, scales.0, w, (g, b, h, 0), x, i0);
                sums = [[[vdupq_n_s16(0); 2]; 2]; R];
            }
            chunk!(2, 1, 0, 1);
            chunk!(3, 1, 2, 3);
            widen!();
            if F == F_Q6K {
                apply_q6k::<R>(&mut acc, &dot, scales.0, w, (g, b, h, 1), x, i0);
            } else {
                apply::<R, F>(&mut acc, &dot, scales, x, i0, b);
            }
        }
        store(&acc, w, r0, i0, out);
    }
}
