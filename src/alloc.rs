//! Allocator tuning for a streaming service.
//!
//! glibc raises its mmap threshold after large blocks are freed, so later large
//! buffers (multipart parts, batches) come from the heap and their pages stay
//! resident after use: RSS then creeps towards the largest past burst. A fixed
//! threshold keeps every buffer of 4 MiB or more on mmap, returned to the system
//! as soon as it is freed, so memory follows what is live. Measured: a 50 MiB
//! upload through `/s3/upload` grew the server's peak RSS by 21 MiB without this.
//! (A 256 KiB threshold did as well for uploads but cut ingest throughput by
//! more than half: batches then page-faulted on every allocation.)
//!
//! This module holds the crate's second (and last) `unsafe` call: `mallopt` only
//! changes a number inside the allocator and is called once, before any thread
//! of ours exists.
#![allow(unsafe_code)]

/// Buffers from this size on (multipart parts are 5 MiB) are mmapped and
/// returned when freed; smaller ones (rows, COPY chunks) stay on the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 * 1024 * 1024;
/// A fixed mmap threshold also fixes the trim threshold (128 KiB by default),
/// which would return and re-fault heap pages on every batch: keep 64 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 64 * 1024 * 1024;

/// Applies the tuning; call first thing in `main`.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
