//! Masked multi-head attention over a layer's kept K/V.
//!
//! Grouped-query attention reads each shared KV head in place (no copies per
//! query head); the score and value products are `gemm` calls on strided
//! slices of the cache, and query heads run in parallel.

use rayon::prelude::*;

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
/// - `k`, `v`: `n_kv × (n_kv_heads·head_dim)`, row-major;
/// - `bias`: `n_q × n_kv` additive mask (0 or −∞); every row allows at least
///   one entry;
/// - `out`: `n_q × (n_heads·head_dim)`.
pub fn attend(h: Heads, q: &[f32], k: &[f32], v: &[f32], bias: &[f32], out: &mut [f32]) {
    let q_dim = h.n_heads * h.head_dim;
    let kv_dim = h.n_kv_heads * h.head_dim;
    let n_q = q.len() / q_dim;
    let n_kv = k.len() / kv_dim;
    debug_assert_eq!(bias.len(), n_q * n_kv);
    debug_assert_eq!(out.len(), n_q * q_dim);
    let group = h.n_heads / h.n_kv_heads;
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    if n_q == 1 {
        return attend_one(h, q, k, v, bias, out, scale);
    }

    // Each query head writes its own column block of `out`.
    let per_head: Vec<Vec<f32>> = (0..h.n_heads)
        .into_par_iter()
        .map(|head| {
            let kvh = head / group;
            let mut scores = vec![0f32; n_q * n_kv];
            let mut o = vec![0f32; n_q * h.head_dim];
            // SAFETY: all pointers and strides stay inside the slices checked above:
            // q rows are q_dim apart, k/v rows kv_dim apart, head offsets < row width.
            unsafe {
                gemm::gemm(
                    n_q,
                    n_kv,
                    h.head_dim,
                    scores.as_mut_ptr(),
                    1,
                    n_kv as isize,
                    false,
                    q.as_ptr().add(head * h.head_dim),
                    1,
                    q_dim as isize,
                    k.as_ptr().add(kvh * h.head_dim),
                    kv_dim as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (row, b) in scores.chunks_mut(n_kv).zip(bias.chunks(n_kv)) {
                softmax_masked(row, b);
            }
            unsafe {
                gemm::gemm(
                    n_q,
                    h.head_dim,
                    n_kv,
                    o.as_mut_ptr(),
                    1,
                    h.head_dim as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n_kv as isize,
                    v.as_ptr().add(kvh * h.head_dim),
                    1,
                    kv_dim as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            o
        })
        .collect();
    for (head, o) in per_head.iter().enumerate() {
        for (row, src) in out.chunks_mut(q_dim).zip(o.chunks(h.head_dim)) {
            row[head * h.head_dim..(head + 1) * h.head_dim].copy_from_slice(src);
        }
    }
}

/// [`attend`] for a single query row: heads spread over candle's worker pool
/// (the one the matmuls use, so the two never fight for cores).
fn attend_one(h: Heads, q: &[f32], k: &[f32], v: &[f32], bias: &[f32], out: &mut [f32], scale: f32) {
    let (hd, kv_dim) = (h.head_dim, h.n_kv_heads * h.head_dim);
    let group = h.n_heads / h.n_kv_heads;
    assert_eq!(out.len(), h.n_heads * hd);
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(h.n_heads, |heads| {
        let mut scores = vec![0f32; bias.len()];
        for head in heads {
            let kvh = head / group;
            let qh = &q[head * hd..(head + 1) * hd];
            for ((s, &b), row) in scores.iter_mut().zip(bias).zip(k.chunks_exact(kv_dim)) {
                *s = if b == f32::NEG_INFINITY { b } else { dot(qh, &row[kvh * hd..(kvh + 1) * hd]) * scale + b };
            }
            softmax(&mut scores);
            // SAFETY: each head writes only its own `hd`-wide block of `out`,
            // whose length was checked above; blocks never overlap.
            let o = unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(head * hd), hd) };
            o.fill(0.0);
            for (&p, row) in scores.iter().zip(v.chunks_exact(kv_dim)) {
                if p != 0.0 {
                    o.iter_mut().zip(&row[kvh * hd..(kvh + 1) * hd]).for_each(|(o, v)| *o += p * v);
                }
            }
        }
    });
}

/// Dot product with independent accumulators, so the compiler vectorizes it.
#[inline]
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

/// In-place softmax of `row + bias`; masked entries become exactly 0.
fn softmax_masked(row: &mut [f32], bias: &[f32]) {
    row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
    softmax(row);
}

/// In-place softmax; −∞ entries become exactly 0.
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = if *x == f32::NEG_INFINITY { 0.0 } else { (*x - max).exp() };
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
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
        // Several query rows (the gemm path) and one (the decode path).
        for (n_q, n_kv, head_dim) in [(5, 11, 8), (1, 11, 8), (1, 37, 24)] {
            check(n_q, n_kv, head_dim);
        }
    }

    fn check(n_q: usize, n_kv: usize, head_dim: usize) {
        let h = Heads { n_heads: 6, n_kv_heads: 2, head_dim };
        let (qd, kd) = (6 * head_dim, 2 * head_dim);
        let f = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let q: Vec<f32> = (0..n_q * qd).map(f).collect();
        let k: Vec<f32> = (0..n_kv * kd).map(|i| f(i + 3)).collect();
        let v: Vec<f32> = (0..n_kv * kd).map(|i| f(i + 11)).collect();
        let bias: Vec<f32> =
            (0..n_q * n_kv).map(|i| if (i * 31) % 7 == 3 && i % n_kv != 0 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mut out = vec![0f32; n_q * qd];
        attend(h, &q, &k, &v, &bias, &mut out);
        let want = naive(h, &q, &k, &v, &bias);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
