//! The machine's read bandwidth, measured by streaming a buffer far larger than the caches: the
//! physical ceiling a decode step (which reads every weight once) is set against.
//!
//! A ceiling must not under-measure (a scalar sum on the bench's threads once put a decode at 1.1
//! of it), so the figure is the best of several methods: each load width the CPU has (AVX-512,
//! AVX2, and the portable loop; chosen with the engine's one CPU probe), on 1 to N threads (N the
//! larger of the bench's threads and the machine's CPUs), over a plain anonymous buffer and over
//! one advised for 2 MiB huge pages before its first touch. The methods take their passes in turn,
//! so drift on a shared host reaches them all alike; each method's figure is the median of its
//! passes, and the ceiling the best method's.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::time::Instant;

use phi_engine::hugepages::HugeBuffer;

use super::progress;
use super::stats::Spread;

/// Passes each method takes over the buffer.
const BANDWIDTH_PASSES: usize = 4;

/// How the loads are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loads {
    Avx512,
    Avx2,
    Portable,
}

impl Loads {
    fn name(self) -> &'static str {
        match self {
            Loads::Avx512 => "avx512",
            Loads::Avx2 => "avx2",
            Loads::Portable => "portable",
        }
    }

    /// Those this CPU runs (by the engine's probe), widest first.
    fn available() -> Vec<Loads> {
        let features = phi_engine::cpu::features();
        let mut loads = Vec::new();
        if cfg!(target_arch = "x86_64") && features.avx512f() {
            loads.push(Loads::Avx512);
        }
        if cfg!(target_arch = "x86_64") && features.avx2() {
            loads.push(Loads::Avx2);
        }
        loads.push(Loads::Portable);
        loads
    }
}

/// One way of streaming the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Method {
    loads: Loads,
    threads: usize,
    huge: bool,
}

impl Method {
    /// `avx512 2t huge`, `portable 1t plain`.
    fn name(&self) -> String {
        format!(
            "{} {}t {}",
            self.loads.name(),
            self.threads,
            if self.huge { "huge" } else { "plain" }
        )
    }
}

/// Every method for `loads` on 1..=`max_threads` threads, over one kind of buffer.
fn methods(loads: &[Loads], max_threads: usize, huge: bool) -> Vec<Method> {
    (1..=max_threads.max(1))
        .flat_map(|threads| loads.iter().map(move |&loads| Method { loads, threads, huge }))
        .collect()
}

/// Each method's name with its GB/s (10^9 bytes) per pass.
#[derive(Debug, Clone, Default)]
pub struct Bandwidth {
    pub methods: Vec<(String, Vec<f64>)>,
}

impl Bandwidth {
    /// Each method's median, in the order measured.
    pub fn figures(&self) -> Vec<(String, f64)> {
        self.methods
            .iter()
            .map(|(name, rates)| (name.clone(), Spread::of(rates).median))
            .collect()
    }

    /// The passes of `self` and `other` together, method by method.
    pub fn merged(&self, other: &Bandwidth) -> Bandwidth {
        let mut methods = self.methods.clone();
        for (name, rates) in &other.methods {
            match methods.iter_mut().find(|(n, _)| n == name) {
                Some((_, mine)) => mine.extend(rates),
                None => methods.push((name.clone(), rates.clone())),
            }
        }
        Bandwidth { methods }
    }

    /// The best method: its name and its passes.
    pub fn best(&self) -> Option<(&str, &[f64])> {
        let figures = self.figures();
        let best = best(&figures)?;
        self.methods
            .iter()
            .find(|(name, _)| *name == figures[best].0)
            .map(|(name, rates)| (name.as_str(), rates.as_slice()))
    }
}

/// The index of the highest finite figure; `None` where there is none.
fn best(figures: &[(String, f64)]) -> Option<usize> {
    figures
        .iter()
        .enumerate()
        .filter(|(_, (_, v))| v.is_finite())
        .max_by(|(_, (_, a)), (_, (_, b))| a.total_cmp(b))
        .map(|(i, _)| i)
}

/// Every method over `mib` MiB, [`BANDWIDTH_PASSES`] passes each, with progress; `threads` is
/// the bench's.
pub fn measure_bandwidth(mib: usize, threads: usize) -> Bandwidth {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max_threads = threads.max(cpus);
    let loads = Loads::available();
    progress(&format!(
        "measuring read bandwidth over {mib} MiB: {} loads, 1..={max_threads} threads, plain and huge-page buffers",
        loads.iter().map(|l| l.name()).collect::<Vec<_>>().join("/")
    ));
    let mut measured = Bandwidth::default();
    for huge in [false, true] {
        let methods = methods(&loads, max_threads, huge);
        let rates = read_bandwidth(mib << 20, huge, &methods, BANDWIDTH_PASSES);
        measured
            .methods
            .extend(methods.iter().map(Method::name).zip(rates));
    }
    if let Some((name, rates)) = measured.best() {
        progress(&format!(
            "read bandwidth {:.1} GB/s ({name})",
            Spread::of(rates).median
        ));
    }
    measured
}

/// Streams one buffer of `bytes` (huge pages asked for where `huge`) with each of `methods` in
/// turn, `passes` times; GB/s per pass, per method. The buffer is written first so its pages are
/// real (not the shared zero page).
fn read_bandwidth(bytes: usize, huge: bool, methods: &[Method], passes: usize) -> Vec<Vec<f64>> {
    let words = (bytes / 8).max(1 << 16);
    let mut buffer = HugeBuffer::new(words, huge);
    let writers = methods.iter().map(|m| m.threads).max().unwrap_or(1);
    let per_thread = words.div_ceil(writers);
    std::thread::scope(|scope| {
        for (part_idx, part) in buffer.as_mut_slice().chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                for (i, word) in part.iter_mut().enumerate() {
                    *word = (part_idx * per_thread + i) as u64;
                }
            });
        }
    });
    let buffer = buffer.as_slice();
    let mut rates = vec![Vec::with_capacity(passes); methods.len()];
    for _ in 0..passes {
        for (method, rates) in methods.iter().zip(&mut rates) {
            let per_thread = words.div_ceil(method.threads);
            let start = Instant::now();
            let total: u64 = std::thread::scope(|scope| {
                let handles: Vec<_> = buffer
                    .chunks(per_thread)
                    .map(|part| scope.spawn(move || sum_words(part, method.loads)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0u64, u64::wrapping_add)
            });
            std::hint::black_box(total);
            rates.push((words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
        }
    }
    rates
}

/// The wrapping sum of `words`, with `loads` (which [`Loads::available`] listed).
fn sum_words(words: &[u64], loads: Loads) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        let features = phi_engine::cpu::features();
        if loads == Loads::Avx512 && features.avx512f() {
            // SAFETY: the CPU has AVX-512F (checked just above, by the engine's probe).
            return unsafe { sum_words_avx512(words) };
        }
        if loads == Loads::Avx2 && features.avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { sum_words_avx2(words) };
        }
    }
    let _ = loads;
    sum_words_portable(words)
}

/// Four 512-bit loads per step into four independent sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let chunks = words.chunks_exact(32);
    let tail = sum_words_portable(chunks.remainder());
    let mut acc = [_mm512_setzero_si512(); 4];
    for chunk in chunks {
        let p = chunk.as_ptr().cast::<__m512i>();
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `chunk` holds 32 u64s, four 64-byte vectors; the load is unaligned.
            *a = _mm512_add_epi64(*a, unsafe { _mm512_loadu_si512(p.add(j)) });
        }
    }
    let sum = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    (_mm512_reduce_add_epi64(sum) as u64).wrapping_add(tail)
}

/// Four 256-bit loads per step into four independent sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let chunks = words.chunks_exact(16);
    let tail = sum_words_portable(chunks.remainder());
    let mut acc = [_mm256_setzero_si256(); 4];
    for chunk in chunks {
        let p = chunk.as_ptr().cast::<__m256i>();
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `chunk` holds 16 u64s, four 32-byte vectors; the load is unaligned.
            *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(j)) });
        }
    }
    let sum = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 bytes; the store is unaligned.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sum) };
    lanes.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

/// Eight independent sums, so the loop vectorizes (at the build's baseline) and no add chain
/// limits it.
#[inline(always)]
fn sum_words_portable(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    for chunk in chunks {
        for (a, &w) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_load_width_sums_every_word() {
        let words: Vec<u64> = (0..1003).collect();
        for loads in Loads::available() {
            assert_eq!(sum_words(&words, loads), 1002 * 1003 / 2, "{loads:?}");
            assert_eq!(sum_words(&words[..7], loads), 21, "{loads:?}");
        }
        assert_eq!(Loads::available().last(), Some(&Loads::Portable));
    }

    #[test]
    fn methods_cover_every_thread_count_and_load_width() {
        let loads = [Loads::Avx2, Loads::Portable];
        let names: Vec<String> = methods(&loads, 2, true).iter().map(Method::name).collect();
        assert_eq!(
            names,
            [
                "avx2 1t huge",
                "portable 1t huge",
                "avx2 2t huge",
                "portable 2t huge"
            ]
        );
        assert_eq!(methods(&loads, 0, false).len(), 2);
    }

    #[test]
    fn the_best_method_is_the_highest_median() {
        let figures = |v: &[f64]| -> Vec<(String, f64)> { v.iter().map(|&x| (format!("{x}"), x)).collect() };
        assert_eq!(best(&figures(&[3.0, 9.5, 7.0])), Some(1));
        assert_eq!(best(&figures(&[f64::NAN, 2.0])), Some(1));
        assert_eq!(best(&figures(&[f64::NAN])), None);
        assert_eq!(best(&[]), None);
        let before = Bandwidth {
            methods: vec![
                ("a".into(), vec![10.0, 12.0, 11.0]),
                ("b".into(), vec![14.0, 1.0, 2.0]),
            ],
        };
        let after = Bandwidth {
            methods: vec![("b".into(), vec![13.0, 13.5]), ("c".into(), vec![5.0])],
        };
        assert_eq!(before.best(), Some(("a", &[10.0, 12.0, 11.0][..])));
        let both = before.merged(&after);
        assert_eq!(
            both.figures(),
            [("a".into(), 11.0), ("b".into(), 13.0), ("c".into(), 5.0)]
        );
        assert_eq!(both.best().map(|(name, _)| name), Some("b"));
    }

    #[test]
    fn a_small_probe_measures_every_method() {
        let measured = measure_bandwidth(1, 2);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(measured.methods.len(), 2 * Loads::available().len() * cpus.max(2));
        assert!(measured.figures().iter().all(|(_, v)| v.is_finite() && *v > 0.0));
        assert!(measured.best().is_some());
    }
}
