//! The one CPU probe: which x86 instruction sets (or, on aarch64, NEON and its dot products) this
//! machine runs, detected once, and which implementation each kernel takes from them. Every kernel
//! of the engine (the quantized and dense matmuls of `qmatmul`, the attention and `gelu_new` of
//! `kernels`) asks here and nowhere else.
//!
//! An implementation is listed for a kernel only where the CPU has every feature that its
//! `#[target_feature]` enables, so an [`Implementation`] is the proof a kernel needs before it
//! calls into SIMD code: it can be made only by [`Features::implementations`]. The engine takes
//! the first (fastest) one that fits the shape at hand; tests run each one against the portable
//! code ([`Features::implementations`] lists them all).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::OnceLock;

/// The instruction sets of this CPU that some kernel uses. Read it with [`features`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    avx2: bool,
    fma: bool,
    f16c: bool,
    avx512f: bool,
    avx512bw: bool,
    avx512vnni: bool,
    /// AMX-TILE and AMX-INT8, with the tile state granted by the OS.
    amx: bool,
    /// Advanced SIMD on aarch64 (part of the base architecture there, so always found on it).
    neon: bool,
    /// The aarch64 8-bit dot products (`sdot`, FEAT_DotProd: Apple M1 on, Neoverse N1 on, not
    /// Cortex-A72).
    dotprod: bool,
}

/// This CPU's features, detected on the first call.
pub fn features() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(Features::detect)
}

/// [`Features::chosen`] of [`features`] for `kernel`, from a table made on the first call: what the
/// kernels ask on every call.
pub fn chosen(kernel: Kernel) -> Option<Implementation> {
    static CHOSEN: OnceLock<[Option<Implementation>; Kernel::ALL.len()]> = OnceLock::new();
    CHOSEN.get_or_init(|| Kernel::ALL.map(|kernel| features().chosen(kernel)))[kernel as usize]
}

impl Features {
    #[cfg(target_arch = "x86_64")]
    fn detect() -> Features {
        let avx512f = is_x86_feature_detected!("avx512f");
        let avx512bw = is_x86_feature_detected!("avx512bw");
        Features {
            avx2: is_x86_feature_detected!("avx2"),
            fma: is_x86_feature_detected!("fma"),
            f16c: is_x86_feature_detected!("f16c"),
            avx512f,
            avx512bw,
            avx512vnni: is_x86_feature_detected!("avx512vnni"),
            amx: avx512f && avx512bw && amx_granted(),
            neon: false,
            dotprod: false,
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn detect() -> Features {
        Features {
            neon: std::arch::is_aarch64_feature_detected!("neon"),
            dotprod: std::arch::is_aarch64_feature_detected!("dotprod"),
            ..Features::default()
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn detect() -> Features {
        Features::default()
    }

    pub fn avx2(&self) -> bool {
        self.avx2
    }

    pub fn fma(&self) -> bool {
        self.fma
    }

    pub fn f16c(&self) -> bool {
        self.f16c
    }

    pub fn avx512f(&self) -> bool {
        self.avx512f
    }

    pub fn avx512bw(&self) -> bool {
        self.avx512bw
    }

    pub fn avx512vnni(&self) -> bool {
        self.avx512vnni
    }

    /// AMX int8 tiles (with AVX-512F/BW, which the AMX kernels use beside them), usable by this
    /// process: the CPU has them and Linux granted the tile state.
    pub fn amx(&self) -> bool {
        self.amx
    }

    /// NEON (Advanced SIMD), on aarch64.
    pub fn neon(&self) -> bool {
        self.neon
    }

    /// NEON's 8-bit dot products (`sdot`), on aarch64.
    pub fn dotprod(&self) -> bool {
        self.dotprod
    }

    /// Whether this CPU runs `isa`'s implementation of `kernel`.
    fn runs(&self, kernel: Kernel, isa: Isa) -> bool {
        let avx2 = self.avx2 && self.fma && self.f16c;
        let avx512 = self.avx512f && self.fma && self.f16c;
        let vnni = avx512 && self.avx512bw && self.avx512vnni;
        match (kernel, isa) {
            (_, Isa::Portable) => kernel.has_portable(),
            (Kernel::Q4kRows | Kernel::Q6kRows | Kernel::Q8_0Rows, Isa::Avx512Vnni) => vnni,
            (
                Kernel::Q4kRows | Kernel::Q6kRows | Kernel::Q8_0Rows | Kernel::Q4kTiles | Kernel::DenseRows,
                Isa::Avx2,
            ) => avx2,
            (Kernel::Q4kTiles | Kernel::Q8_0Tiles, Isa::Amx) => self.amx && avx2 && self.fma,
            (Kernel::DenseRows, Isa::Avx512) => avx512,
            (Kernel::DensePanels, Isa::Avx512) => self.avx512f,
            (Kernel::DensePanels | Kernel::Attention | Kernel::Gelu, Isa::Avx2) => self.avx2 && self.fma,
            (Kernel::AttentionF16, Isa::Avx2) => avx2,
            (Kernel::Q8_0Rows | Kernel::Q4kRows | Kernel::Q6kRows, Isa::NeonDotprod) => {
                self.neon && self.dotprod
            }
            (Kernel::Q8_0Rows | Kernel::Q4kRows | Kernel::Q6kRows | Kernel::DenseRows, Isa::Neon) => {
                self.neon
            }
            _ => false,
        }
    }

    /// The implementations of `kernel` this CPU runs, fastest first; the engine takes the first
    /// that fits the shape at hand.
    pub fn implementations(&self, kernel: Kernel) -> impl Iterator<Item = Implementation> + '_ {
        Isa::ALL
            .into_iter()
            .filter(move |&isa| self.runs(kernel, isa))
            .map(move |isa| Implementation { kernel, isa })
    }

    /// `isa`'s implementation of `kernel`, where this CPU runs it.
    pub fn implementation(&self, kernel: Kernel, isa: Isa) -> Option<Implementation> {
        self.runs(kernel, isa).then_some(Implementation { kernel, isa })
    }

    /// The fastest implementation of `kernel` on this CPU; `None` where only candle's own op
    /// serves (q8_0 rows without AVX2 or NEON, q8_0 tiles without AMX).
    pub fn chosen(&self, kernel: Kernel) -> Option<Implementation> {
        self.implementations(kernel).next()
    }

    /// The instruction sets the kernels use, and the implementation each kernel takes: what a
    /// benchmark report states about the machine.
    pub fn kernels(&self) -> Kernels {
        Kernels(*self)
    }
}

impl std::fmt::Display for Features {
    /// The features present, by their usual names (`avx2 fma f16c avx512f …`), or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512vnni, "avx512vnni"),
            (self.amx, "amx"),
            (self.neon, "neon"),
            (self.dotprod, "dotprod"),
        ];
        let present: Vec<&str> = names
            .iter()
            .filter(|(has, _)| *has)
            .map(|&(_, name)| name)
            .collect();
        if present.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&present.join(" "))
        }
    }
}

/// Each kernel with the implementation it takes here, as `q4k rows: avx512-vnni, …` (`candle`
/// where none of ours runs).
pub struct Kernels(Features);

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, kernel) in Kernel::ALL.into_iter().enumerate() {
            let chosen = self.0.chosen(kernel).map_or("candle", |imp| imp.isa().name());
            write!(f, "{}{}: {chosen}", if i > 0 { ", " } else { "" }, kernel.name())?;
        }
        Ok(())
    }
}

/// One job that has an implementation per instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Kernel {
    /// q4k weights against a few activation rows (decode, a keystroke's tokens); portable.
    Q4kRows,
    /// q4k weights of whole 16-row tiles against many rows (prefill); the portable path is the
    /// row kernel in chunks.
    Q4kTiles,
    /// q6k weights against any number of rows (in chunks); portable.
    Q6kRows,
    /// Repacked q8_0 weights against any number of rows; without it candle keeps the weights.
    Q8_0Rows,
    /// Repacked q8_0 weights against many rows on AMX; without it the row kernel serves.
    Q8_0Tiles,
    /// f32, f16 and bf16 weights widened as they stream, against a few rows; portable.
    DenseRows,
    /// f32, f16 and bf16 weights in L1-sized panels against many rows; the portable path is
    /// candle's f32 matmul on widened blocks of rows.
    DensePanels,
    /// Attention of new positions over an f32 cache; portable.
    Attention,
    /// Attention over an f16 cache, widened as it is read; portable.
    AttentionF16,
    /// `gelu_new`; portable.
    Gelu,
}

impl Kernel {
    pub const ALL: [Kernel; 10] = [
        Kernel::Q4kRows,
        Kernel::Q4kTiles,
        Kernel::Q6kRows,
        Kernel::Q8_0Rows,
        Kernel::Q8_0Tiles,
        Kernel::DenseRows,
        Kernel::DensePanels,
        Kernel::Attention,
        Kernel::AttentionF16,
        Kernel::Gelu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Q4kRows => "q4k rows",
            Kernel::Q4kTiles => "q4k tiles",
            Kernel::Q6kRows => "q6k rows",
            Kernel::Q8_0Rows => "q8_0 rows",
            Kernel::Q8_0Tiles => "q8_0 tiles",
            Kernel::DenseRows => "dense rows",
            Kernel::DensePanels => "dense panels",
            Kernel::Attention => "attention",
            Kernel::AttentionF16 => "attention f16",
            Kernel::Gelu => "gelu",
        }
    }

    fn has_portable(self) -> bool {
        !matches!(self, Kernel::Q8_0Rows | Kernel::Q8_0Tiles)
    }
}

/// The instruction set an implementation is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Intel AMX int8 tiles.
    Amx,
    /// AVX-512 (F, BW) with VNNI's integer dot products.
    Avx512Vnni,
    /// AVX-512F.
    Avx512,
    /// AVX2 with FMA (and F16C where the kernel widens f16).
    Avx2,
    /// NEON with the 8-bit dot products (`sdot`).
    NeonDotprod,
    /// aarch64's Advanced SIMD (base NEON: no dot-product or half-precision arithmetic extensions).
    Neon,
    /// Plain Rust, whatever the compiler makes of it.
    Portable,
}

impl Isa {
    /// Fastest first: the order [`Features::implementations`] lists them in.
    const ALL: [Isa; 7] = [
        Isa::Amx,
        Isa::Avx512Vnni,
        Isa::Avx512,
        Isa::Avx2,
        Isa::NeonDotprod,
        Isa::Neon,
        Isa::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::NeonDotprod => "neon-dotprod",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }
}

/// An implementation of a kernel that this CPU runs: made only by [`Features::implementations`],
/// so holding one is the proof that the features of `isa`'s code for `kernel` were detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Implementation {
    kernel: Kernel,
    isa: Isa,
}

impl Implementation {
    pub fn kernel(self) -> Kernel {
        self.kernel
    }

    pub fn isa(self) -> Isa {
        self.isa
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kernel.name(), self.isa.name())
    }
}

/// Whether the CPU has AMX-TILE and AMX-INT8 and Linux lets this process use the tile state
/// (asked once, by [`features`]).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_granted() -> bool {
    // AMX-TILE and AMX-INT8 are CPUID leaf 7 EDX bits 24 and 25 (std cannot detect them yet).
    // SAFETY: `cpuid` exists on every x86-64 CPU and leaf 7 on every one with AVX-512, which the
    // caller checked first (newer Rust calls `__cpuid_count` safe).
    #[allow(unused_unsafe)]
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    if edx & (0b11 << 24) != 0b11 << 24 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it fails cleanly on kernels without AMX.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    granted == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn amx_granted() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_but_q8_0_has_a_portable_implementation_listed_last() {
        let f = features();
        for kernel in Kernel::ALL {
            let isas: Vec<Isa> = f.implementations(kernel).map(Implementation::isa).collect();
            assert_eq!(
                isas.last() == Some(&Isa::Portable),
                kernel.has_portable(),
                "{kernel:?}"
            );
            assert!(isas.iter().all(|&isa| f.runs(kernel, isa)));
            assert_eq!(chosen(kernel), f.chosen(kernel));
            assert_eq!(Kernel::ALL[kernel as usize], kernel);
        }
        let none = Features::default();
        assert_eq!(
            none.chosen(Kernel::Q4kRows).map(Implementation::isa),
            Some(Isa::Portable)
        );
        assert_eq!(none.chosen(Kernel::Q8_0Rows), None);
        assert_eq!(none.to_string(), "none");
        let neon = Features {
            neon: true,
            ..Features::default()
        };
        for kernel in [
            Kernel::Q4kRows,
            Kernel::Q6kRows,
            Kernel::Q8_0Rows,
            Kernel::DenseRows,
        ] {
            let isas: Vec<Isa> = neon.implementations(kernel).map(Implementation::isa).collect();
            assert_eq!(isas[0], Isa::Neon, "{kernel:?}");
        }
        assert_eq!(neon.to_string(), "neon");
        let dotprod = Features {
            dotprod: true,
            ..neon
        };
        for kernel in [Kernel::Q4kRows, Kernel::Q6kRows, Kernel::Q8_0Rows] {
            let isas: Vec<Isa> = dotprod.implementations(kernel).map(Implementation::isa).collect();
            assert_eq!(isas[..2], [Isa::NeonDotprod, Isa::Neon], "{kernel:?}");
        }
        #[cfg(target_arch = "aarch64")]
        assert!(f.neon(), "NEON is part of aarch64");
        assert!(none
            .kernels()
            .to_string()
            .starts_with("q4k rows: portable, q4k tiles: portable"));
    }
}
