//! What this CPU offers the engine and what the engine uses of it
//! (`anchorcoder cpu`, printed at the start of `scripts/test` so that a
//! failure on a new machine is easy to place).
//!
//! AMX: some machines of this project's kind advertise AMX (`amx_tile`,
//! `amx_int8`, `amx_bf16`), yet native builds of llama.cpp, whose AMX kernels
//! that advertisement switches on, die there with a segmentation fault. A
//! program may only use AMX after three independent yeses: the CPU says so
//! (CPUID leaf 7), the operating system saves the tile state (XCR0 bits 17 and
//! 18), and Linux grants this process the tile data (`arch_prctl
//! ARCH_REQ_XCOMP_PERM`). [`Amx::detect`] reads the first two and asks the
//! kernel whether it supports the third (`ARCH_GET_XCOMP_SUPP`, read-only),
//! without requesting it: the engine has no AMX kernel and never executes an
//! AMX instruction (`scripts/test` checks the binary with objdump).

use std::fmt;

use super::kv_cache::KvPrecision;
use super::quant::Kernel;

/// The AMX state of this machine, as far as can be known without using it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amx {
    /// CPUID.(EAX=7,ECX=0):EDX bits 24 (tile), 25 (int8), 22 (bf16).
    pub tile: bool,
    pub int8: bool,
    pub bf16: bool,
    /// XCR0 bits 17 and 18: the OS saves and restores tile state.
    pub os_enabled: bool,
    /// Linux's `ARCH_GET_XCOMP_SUPP` includes XTILEDATA (bit 18): a process
    /// could request it. `None` where the question cannot be asked.
    pub kernel_supports: Option<bool>,
}

impl Amx {
    /// Read the CPU's and the OS's answers (no AMX instruction, no permission
    /// request).
    pub fn detect() -> Amx {
        #[cfg(target_arch = "x86_64")]
        {
            detect_x86()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Amx { tile: false, int8: false, bf16: false, os_enabled: false, kernel_supports: None }
        }
    }

    /// Whether a program could use AMX int8 here after requesting the
    /// permission (it still has to request it, and to survive a probe).
    pub fn usable(&self) -> bool {
        self.tile && self.int8 && self.os_enabled && self.kernel_supports == Some(true)
    }
}

impl fmt::Display for Amx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !(self.tile || self.int8 || self.bf16) {
            return write!(f, "not advertised by the CPU");
        }
        let yes = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "advertised (tile {}, int8 {}, bf16 {}); tile state enabled by the OS: {}; Linux supports granting it: {}",
            yes(self.tile),
            yes(self.int8),
            yes(self.bf16),
            yes(self.os_enabled),
            self.kernel_supports.map_or("unknown", yes)
        )
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_x86() -> Amx {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // Leaf 7 is read only when the maximum leaf reaches it.
    let max = __cpuid(0).eax;
    let (leaf1, leaf7) = (__cpuid(1), if max >= 7 { Some(__cpuid_count(7, 0)) } else { None });
    let edx7 = leaf7.map_or(0, |r| r.edx);
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    let xcr0 = if osxsave {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV(0) is valid whenever CPUID reports OSXSAVE.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (u64::from(hi) << 32) | u64::from(lo)
    } else {
        0
    };
    Amx {
        tile: edx7 & (1 << 24) != 0,
        int8: edx7 & (1 << 25) != 0,
        bf16: edx7 & (1 << 22) != 0,
        os_enabled: xcr0 & (0b11 << 17) == 0b11 << 17,
        kernel_supports: kernel_supports_xtiledata(),
    }
}

/// `arch_prctl(ARCH_GET_XCOMP_SUPP)`: the extended states Linux can grant.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn kernel_supports_xtiledata() -> Option<bool> {
    const ARCH_GET_XCOMP_SUPP: libc::c_long = 0x1021;
    const XFEATURE_XTILEDATA: u32 = 18;
    let mut mask: u64 = 0;
    // SAFETY: the call writes one u64 through the pointer we pass.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, &mut mask as *mut u64) };
    (rc == 0).then_some(mask & (1 << XFEATURE_XTILEDATA) != 0)
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn kernel_supports_xtiledata() -> Option<bool> {
    None
}

/// The SIMD extensions the engine's kernels (ours and candle's) care about,
/// with whether this CPU has them (run-time detection).
pub fn simd_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => { vec![$(($f, is_x86_feature_detected!($f))),*] };
        }
        detect!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni"
        )
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => { vec![$(($f, std::arch::is_aarch64_feature_detected!($f))),*] };
        }
        detect!("neon", "dotprod", "i8mm", "fp16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

/// The report `anchorcoder cpu` prints.
pub fn report() -> String {
    let features: Vec<String> =
        simd_features().into_iter().map(|(name, on)| format!("{}{name}", if on { "+" } else { "-" })).collect();
    let amx = Amx::detect();
    format!(
        "arch: {}\nsimd: {}\nquantized kernel: {:?} (ANCHORCODER_KERNEL=scalar|avx2|neon forces a lower one, for attention too)\n\
         amx: {amx}\namx use: none (the engine has no AMX kernel and executes no AMX instruction{})\n\
         k/v rows: {}\n",
        std::env::consts::ARCH,
        features.join(" "),
        Kernel::best(),
        if amx.usable() { "; this machine could grant it" } else { "" },
        kv_rows(),
    )
}

/// How caches store K/V rows, and what chose it.
fn kv_rows() -> String {
    match KvPrecision::explicit() {
        Some(p) => format!("{} (ANCHORCODER_KV)", p.name()),
        None => format!(
            "{} (f16 for a model with key biases; ANCHORCODER_KV=q8|f16|f32 sets it)",
            KvPrecision::default().name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_kernel_in_use_and_agrees_with_run_time_detection() {
        let r = report();
        assert!(r.contains(&format!("quantized kernel: {:?}", Kernel::best())), "{r}");
        assert!(r.contains(&format!("k/v rows: {} (", KvPrecision::from_env().name())), "{r}");
        // The kernel the engine picks needs exactly the features the report shows as present.
        let has = |f: &str| simd_features().iter().any(|(n, on)| *n == f && *on);
        match Kernel::best() {
            Kernel::Avx512Vnni => assert!(has("avx512vnni") && has("avx512bw") && has("avx2"), "{r}"),
            Kernel::Avx2 => assert!(has("avx2") && has("fma") && has("f16c"), "{r}"),
            Kernel::NeonDot => assert!(has("neon") && has("dotprod"), "{r}"),
            Kernel::Neon => assert!(has("neon"), "{r}"),
            Kernel::Scalar => {}
        }
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn amx_flags_agree_with_what_linux_lists_in_proc_cpuinfo() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let amx = Amx::detect();
        // Linux lists a flag only when CPUID has it (and hides it when the
        // kernel cannot manage its state), so CPUID says yes wherever Linux does.
        for (flag, cpuid) in [("amx_tile", amx.tile), ("amx_int8", amx.int8), ("amx_bf16", amx.bf16)] {
            assert!(!flags.contains(&flag) || cpuid, "{flag} in /proc/cpuinfo, not in CPUID: {amx:?}");
        }
        if !amx.tile {
            assert!(!amx.usable() && !flags.contains(&"amx_tile"), "{amx:?}");
        }
    }
}
