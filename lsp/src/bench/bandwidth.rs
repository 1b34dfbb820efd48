//! The machine's read bandwidth, measured by streaming a buffer far larger than the caches: the
//! physical ceiling a decode step (which reads every weight once) is set against.

use std::time::Instant;

use super::progress;
use super::stats::Spread;

/// Bandwidth passes over the buffer.
const BANDWIDTH_PASSES: usize = 8;

/// [`read_bandwidth`] over `mib` MiB with the bench's passes, with progress.
pub fn measure_bandwidth(mib: usize, threads: usize) -> Vec<f64> {
    progress(&format!("measuring read bandwidth over {mib} MiB"));
    let rates = read_bandwidth(mib << 20, threads, BANDWIDTH_PASSES);
    progress(&format!("read bandwidth {:.1} GB/s", Spread::of(&rates).median));
    rates
}

/// Streams a buffer of `bytes` on `threads` threads, `passes` times; GB/s (10^9 bytes) per pass.
/// The buffer is written first so its pages are real (not the shared zero page).
fn read_bandwidth(bytes: usize, threads: usize, passes: usize) -> Vec<f64> {
    let words = (bytes / 8).max(1 << 16);
    let mut buffer = vec![0u64; words];
    let per_thread = words.div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        for (part_idx, part) in buffer.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                for (i, word) in part.iter_mut().enumerate() {
                    *word = (part_idx * per_thread + i) as u64;
                }
            });
        }
    });
    let mut rates = Vec::with_capacity(passes);
    for _ in 0..passes {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(per_thread)
                .map(|part| scope.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        rates.push((words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    rates
}

/// Eight independent sums, so the loop vectorizes and no add chain limits it; with AVX2 where the
/// CPU has it (a baseline x86-64 build would use SSE2, which streams ~20% slower here).
fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { sum_words_avx2(words) };
    }
    sum_words_portable(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    sum_words_portable(words)
}

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
    fn sums_every_word() {
        let words: Vec<u64> = (0..1003).collect();
        assert_eq!(sum_words(&words), 1002 * 1003 / 2);
    }
}
