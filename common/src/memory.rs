//! How the services' memory allocator behaves.

/// Allocations from this size up get their own mapping, returned to the
/// kernel when freed.
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Fixes glibc malloc's mmap threshold, so that large short-lived buffers
/// do not stay resident after they are freed.
///
/// glibc starts at 128 KiB but raises the threshold (to as much as 32 MiB)
/// each time a mapped chunk is freed, so after the first large buffer every
/// later one (a full list from the watcher, a cache file being written, a
/// hash table growing) comes from the heap instead, and its pages stay with
/// the process. At 10,000 Services that kept datapath-svc about 7 MiB
/// above what it holds (bench/README.md, memory). Setting the threshold
/// turns the adjustment off.
///
/// Call at the start of `main`. A no-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters, under malloc's own
    // lock; it touches no memory of ours.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
