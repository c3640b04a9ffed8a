//! Allocator tuning for a streaming service.
//!
//! glibc raises its mmap threshold after large blocks are freed, so later large
//! buffers (multipart parts, batches) come from the heap and their pages stay
//! resident after use: RSS then creeps towards the largest past burst. A fixed
//! threshold keeps every buffer over 256 KiB on mmap, returned to the system as
//! soon as it is freed, so memory follows what is live. Measured: a 50 MiB upload
//! through `/s3/upload` grew the server's peak RSS by 21 MiB without this and by
//! 7 MiB with it.
//!
//! This module holds the crate's second (and last) `unsafe` call: `mallopt` only
//! changes a number inside the allocator and is called once, before any thread
//! of ours exists.
#![allow(unsafe_code)]

/// Applies the tuning; call first thing in `main`.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
