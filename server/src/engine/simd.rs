//! Plain loops compiled for the best instruction set this CPU has.
//!
//! Release artifacts are built for the baseline of their target (x86-64:
//! SSE2), so that one binary runs on every machine. The quantized kernels and
//! the f16 attention kernels pick their SIMD paths at run time themselves;
//! [`run`] does the same for the engine's ordinary loops (softmax, `exp`,
//! maxima), which the compiler vectorizes only as wide as it is allowed to.
//! It calls a closure inside a function compiled with AVX-512F or AVX2+FMA
//! when the CPU has them, so that the closure's body, and every
//! `#[inline(always)]` function it calls, is vectorized for that set.
//! Built with `target-cpu=native`, every variant is the same code.
//!
//! The closure should be marked `#[inline(always)]` (the body must be
//! inlined into the feature-enabled function to be compiled with its
//! features); results are the same on every path up to float
//! reassociation the compiler may already do.

use std::sync::OnceLock;

/// The instruction sets [`run`] chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512F (and AVX2, FMA): 16 floats a register.
    Avx512,
    /// AVX2 and FMA: 8 floats a register.
    Avx2,
    /// What the build targets.
    Baseline,
}

impl Level {
    /// The best level this CPU runs (detected once).
    pub fn best() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(detect)
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Call `f`, compiled for [`Level::best`].
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    run_at(Level::best(), f)
}

/// Call `f` compiled for `level`, which must not exceed [`Level::best`]
/// (tests use it to compare the paths).
#[inline(always)]
pub fn run_at<R>(level: Level, f: impl FnOnce() -> R) -> R {
    assert!(level_ok(level), "{level:?} is not available on this CPU");
    match level {
        // SAFETY: `level_ok` checked that the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512(f) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2(f) },
        _ => f(),
    }
}

fn level_ok(level: Level) -> bool {
    matches!((Level::best(), level), (_, Level::Baseline) | (Level::Avx512, _) | (Level::Avx2, Level::Avx2))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_available_level_computes_the_same_sums() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let sum = |x: &[f32]| {
            let mut acc = [0f32; 16];
            for c in x.chunks_exact(16) {
                for i in 0..16 {
                    acc[i] += c[i] * c[i];
                }
            }
            acc.iter().sum::<f32>() + x.chunks_exact(16).remainder().iter().map(|v| v * v).sum::<f32>()
        };
        let base = run_at(Level::Baseline, || sum(&x));
        for level in [Level::Avx2, Level::Avx512] {
            if level_ok(level) {
                // Same lanes, same order of additions: bit for bit.
                assert_eq!(
                    run_at(
                        level,
                        #[inline(always)]
                        || sum(&x)
                    ),
                    base,
                    "{level:?}"
                );
            }
        }
        assert!(level_ok(Level::Baseline) && level_ok(Level::best()));
    }
}
