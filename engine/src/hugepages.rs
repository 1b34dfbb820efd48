//! Transparent huge pages for the weights. Every weight format ends up in anonymous memory after
//! load (q8_0 as repacked tiles in a `Vec`, q4k/q6k as candle's `QTensor` blocks read or
//! quantized into a `Vec`, f16/bf16/f32 as candle tensors copied out of the mapped safetensors),
//! which Linux backs with 4 KiB pages unless asked: where `/sys/kernel/mm/transparent_hugepage/enabled`
//! is `madvise`, a decode step that streams every weight then walks the TLB once per 4 KiB. After
//! load, [`advise`] marks each large buffer `MADV_HUGEPAGE` and collapses it at once with
//! `MADV_COLLAPSE` (Linux ≥ 6.1), each aligned inward to 2 MiB. Both are hints: errors are ignored
//! (the first one logged at debug). `PHI_LSP_HUGEPAGES=0` turns the pass off. Elsewhere than Linux
//! it does nothing.
//!
//! [`HugeBuffer`] is a 2 MiB-aligned anonymous buffer advised before its first touch (the bench's
//! bandwidth probe streams one), and [`anon_huge_pages_bytes`] what this process holds in huge
//! pages, for the bench's report.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// A transparent huge page on x86-64 and on most arm64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// The environment variable that turns the pass off when it is `0`.
pub const ENV: &str = "PHI_LSP_HUGEPAGES";

/// Whether the post-load pass runs: unless [`ENV`] is `0` (or `off`, `false`).
pub fn enabled() -> bool {
    !std::env::var(ENV).is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"))
}

/// The whole huge pages inside `[addr, addr + len)`: their start and length, `None` where the
/// range holds none.
pub fn aligned_inward(addr: usize, len: usize) -> Option<(usize, usize)> {
    let start = addr.checked_add(HUGE_PAGE - 1)? / HUGE_PAGE * HUGE_PAGE;
    let end = addr.checked_add(len)? / HUGE_PAGE * HUGE_PAGE;
    (end > start).then(|| (start, end - start))
}

/// What [`advise`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advised {
    /// Buffers with at least one whole huge page in them.
    pub buffers: usize,
    /// Bytes of those whole huge pages.
    pub bytes: usize,
    /// Of those, bytes `MADV_COLLAPSE` reported collapsed.
    pub collapsed: usize,
}

/// Asks for huge pages under every whole 2 MiB of each buffer of `buffers`, given as its address
/// and length in bytes (anonymous private memory that lives through the call: the weights after
/// load). Does nothing when [`enabled`] is false or off Linux.
pub fn advise(buffers: impl IntoIterator<Item = (usize, usize)>) -> Advised {
    let mut advised = Advised::default();
    if !enabled() {
        return advised;
    }
    for (addr, len) in buffers {
        let Some((start, len)) = aligned_inward(addr, len) else {
            continue;
        };
        advised.buffers += 1;
        advised.bytes += len;
        if sys::advise(start, len, true) {
            advised.collapsed += len;
        }
    }
    if advised.buffers > 0 {
        tracing::debug!(
            buffers = advised.buffers,
            bytes = advised.bytes,
            collapsed = advised.collapsed,
            "weights advised for huge pages"
        );
    }
    advised
}

/// Bytes of this process's anonymous memory in transparent huge pages (`AnonHugePages` of
/// `/proc/self/smaps_rollup`); `None` where the file is not there.
pub fn anon_huge_pages_bytes() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    smaps_field(&rollup, "AnonHugePages")
}

/// The `name: N kB` line of an smaps text, in bytes.
fn smaps_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        let kb = value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        (key.trim() == name).then_some(kb * 1024)
    })
}

/// A zeroed buffer of `u64`s, 2 MiB aligned, in its own anonymous mapping, advised for huge pages
/// (or not) before its first touch. Off Linux, or where the mapping fails, a plain `Vec` instead.
pub struct HugeBuffer {
    inner: sys::Mapping,
}

impl HugeBuffer {
    /// `words` zeroed `u64`s; huge pages asked for where `huge`.
    pub fn new(words: usize, huge: bool) -> HugeBuffer {
        HugeBuffer {
            inner: sys::Mapping::new(words, huge),
        }
    }

    /// Whether the buffer is a 2 MiB-aligned mapping advised for huge pages (not the fallback).
    pub fn is_huge(&self) -> bool {
        self.inner.huge
    }

    pub fn as_slice(&self) -> &[u64] {
        self.inner.as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u64] {
        self.inner.as_mut_slice()
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::HUGE_PAGE;

    /// `MADV_COLLAPSE` (Linux 6.1); the libc crate does not name it yet.
    const MADV_COLLAPSE: libc::c_int = 25;

    /// Logs the first failure of a kind at debug, once per process.
    fn log_once(what: &str, start: usize, len: usize) {
        static LOGGED: AtomicBool = AtomicBool::new(false);
        if !LOGGED.swap(true, Ordering::Relaxed) {
            let error = std::io::Error::last_os_error();
            tracing::debug!(%error, start, len, "{what} failed (huge pages are a hint; going on)");
        }
    }

    /// `MADV_HUGEPAGE` over `[start, start + len)` (2 MiB aligned), then `MADV_COLLAPSE` where
    /// `collapse`; whether the collapse succeeded.
    pub(super) fn advise(start: usize, len: usize, collapse: bool) -> bool {
        // SAFETY: madvise with these advices changes no contents: MADV_HUGEPAGE only marks the
        // range, MADV_COLLAPSE copies its pages into huge pages in place. The range lies inside
        // a live buffer the caller borrows, and a range that is not (fully) mapped fails with an
        // error, which is ignored.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            log_once("madvise(MADV_HUGEPAGE)", start, len);
            return false;
        }
        if !collapse {
            return false;
        }
        // SAFETY: as above.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, MADV_COLLAPSE) } != 0 {
            log_once("madvise(MADV_COLLAPSE)", start, len);
            return false;
        }
        true
    }

    pub(super) struct Mapping {
        /// The mapping's start, its length in bytes; `None` for the fallback.
        map: Option<(*mut libc::c_void, usize)>,
        fallback: Vec<u64>,
        words: usize,
        pub(super) huge: bool,
    }

    // SAFETY: the mapping is owned memory like a Vec's; nothing else refers to it.
    unsafe impl Send for Mapping {}
    // SAFETY: shared access only reads it.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        pub(super) fn new(words: usize, huge: bool) -> Mapping {
            let bytes = words * 8;
            if words == 0 {
                return Mapping {
                    map: None,
                    fallback: Vec::new(),
                    words,
                    huge: false,
                };
            }
            // Over-map by a huge page so a 2 MiB-aligned start fits inside.
            let len = bytes + HUGE_PAGE;
            // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
            // result is checked against MAP_FAILED.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Mapping {
                    map: None,
                    fallback: vec![0; words],
                    words,
                    huge: false,
                };
            }
            if huge {
                let start = (base as usize).next_multiple_of(HUGE_PAGE);
                // Before the first touch, so the first faults already take huge pages.
                // SAFETY: `[start, start + bytes)` lies in the mapping just made.
                let advised =
                    unsafe { libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
                if advised != 0 {
                    log_once("madvise(MADV_HUGEPAGE)", start, bytes);
                }
            }
            Mapping {
                map: Some((base, len)),
                fallback: Vec::new(),
                words,
                huge,
            }
        }

        fn start(&self) -> Option<*mut u64> {
            self.map
                .map(|(base, _)| (base as usize).next_multiple_of(HUGE_PAGE) as *mut u64)
        }

        pub(super) fn as_slice(&self) -> &[u64] {
            match self.start() {
                // SAFETY: `words` u64s from the aligned start lie in the mapping (over-mapped by
                // a huge page), zeroed by the kernel and owned by `self`.
                Some(start) => unsafe { std::slice::from_raw_parts(start, self.words) },
                None => &self.fallback,
            }
        }

        pub(super) fn as_mut_slice(&mut self) -> &mut [u64] {
            match self.start() {
                // SAFETY: as in `as_slice`, borrowed mutably through `&mut self`.
                Some(start) => unsafe { std::slice::from_raw_parts_mut(start, self.words) },
                None => &mut self.fallback,
            }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            if let Some((base, len)) = self.map {
                // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`.
                unsafe { libc::munmap(base, len) };
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub(super) fn advise(_start: usize, _len: usize, _collapse: bool) -> bool {
        false
    }

    pub(super) struct Mapping {
        fallback: Vec<u64>,
        pub(super) huge: bool,
    }

    impl Mapping {
        pub(super) fn new(words: usize, _huge: bool) -> Mapping {
            Mapping {
                fallback: vec![0; words],
                huge: false,
            }
        }

        pub(super) fn as_slice(&self) -> &[u64] {
            &self.fallback
        }

        pub(super) fn as_mut_slice(&mut self) -> &mut [u64] {
            &mut self.fallback
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_inward_to_whole_huge_pages() {
        assert_eq!(aligned_inward(0, HUGE_PAGE), Some((0, HUGE_PAGE)));
        assert_eq!(aligned_inward(1, HUGE_PAGE), None);
        assert_eq!(aligned_inward(1, 2 * HUGE_PAGE), Some((HUGE_PAGE, HUGE_PAGE)));
        assert_eq!(
            aligned_inward(HUGE_PAGE - 8, 3 * HUGE_PAGE + 16),
            Some((HUGE_PAGE, 3 * HUGE_PAGE))
        );
        assert_eq!(aligned_inward(4096, HUGE_PAGE - 4096), None);
        assert_eq!(aligned_inward(usize::MAX - 4, 16), None);
    }

    #[test]
    fn reads_anon_huge_pages_from_smaps() {
        let text = "Rss:              123 kB\nAnonymous:         10 kB\nAnonHugePages:    4096 kB\n";
        assert_eq!(smaps_field(text, "AnonHugePages"), Some(4096 * 1024));
        assert_eq!(smaps_field(text, "Anonymous"), Some(10 * 1024));
        assert_eq!(smaps_field(text, "ShmemHugePages"), None);
    }

    #[test]
    fn huge_buffers_are_aligned_zeroed_and_writable() {
        for huge in [false, true] {
            let mut buffer = HugeBuffer::new(3 * HUGE_PAGE / 8 + 5, huge);
            assert_eq!(buffer.as_slice().len(), 3 * HUGE_PAGE / 8 + 5);
            assert!(buffer.as_slice().iter().all(|&w| w == 0));
            buffer.as_mut_slice()[7] = 9;
            assert_eq!(buffer.as_slice()[7], 9);
            if cfg!(target_os = "linux") {
                assert_eq!(buffer.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
                assert_eq!(buffer.is_huge(), huge);
            }
        }
        assert!(HugeBuffer::new(0, true).as_slice().is_empty());
    }

    #[test]
    fn advising_a_buffer_leaves_its_bytes_alone() {
        let data: Vec<u8> = (0..3 * HUGE_PAGE).map(|i| (i % 251) as u8).collect();
        let advised = advise([(data.as_ptr() as usize, data.len())]);
        if enabled() {
            assert_eq!(advised.buffers, 1);
            assert!(advised.bytes >= HUGE_PAGE);
        }
        assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        assert_eq!(advise([(data.as_ptr() as usize, 16)]).buffers, 0);
    }
}
