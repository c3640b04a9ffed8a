//! The allocator, tuned for a streaming service.
//!
//! mimalloc is the global allocator: decoded rows are allocated on decoding
//! threads and freed on the writer's once their batch landed, a pattern that
//! costs glibc malloc about a quarter of the ingest's CPU (measured with
//! `perf record -g` on `bench`: malloc and free were 28% of the process; with
//! mimalloc the ingest's CPU for 300,000 records fell from 4.1 to 3.4-3.9 s).
//!
//! mimalloc keeps freed memory for a second by default and reserves its arenas
//! committed, which raised the API's peak RSS under concurrent large requests by
//! half (`bench --scenario api-memory`). Three options bring it back, each left
//! alone when its `MIMALLOC_*` variable is set:
//! - objects of 4 MiB or more (multipart parts, large COPY buffers) are mapped
//!   from the system on their own and returned when freed (`arena_max_object_size`);
//! - freed memory goes back to the system after 100 ms, not a second (`purge_delay`);
//! - arenas are committed as they are used (`arena_eager_commit`).
//!
//! glibc malloc still serves the C libraries (librdkafka): its mmap threshold is
//! fixed, so that large blocks freed there do not stay resident either.
//!
//! This module holds `unsafe` calls of its own (the crate denies it elsewhere):
//! `mallopt` and `mi_option_set` only change numbers inside the allocators and are
//! called once, first thing in `main`, before any thread of ours exists.
#![allow(unsafe_code)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// glibc: buffers from this size on are mmapped and returned when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 * 1024 * 1024;
/// A fixed mmap threshold also fixes the trim threshold (128 KiB by default),
/// which would return and re-fault heap pages on every batch: keep 64 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 64 * 1024 * 1024;

/// mimalloc 3.3's option numbers (`mi_option_e` in mimalloc.h; the sys crate is
/// pinned to the version whose header these come from, and a test reads each
/// option back by its name).
mod mi {
    pub const ARENA_EAGER_COMMIT: i32 = 4;
    pub const PURGE_DELAY: i32 = 15;
    pub const ARENA_MAX_OBJECT_SIZE: i32 = 45;
}

/// The mimalloc options set, with the variable that overrides each.
const MIMALLOC_OPTIONS: [(i32, &std::ffi::CStr, std::ffi::c_long); 3] = [
    (mi::ARENA_MAX_OBJECT_SIZE, c"MIMALLOC_ARENA_MAX_OBJECT_SIZE", 4 * 1024), // KiB
    (mi::PURGE_DELAY, c"MIMALLOC_PURGE_DELAY", 100),                          // ms
    (mi::ARENA_EAGER_COMMIT, c"MIMALLOC_ARENA_EAGER_COMMIT", 0),
];

/// Sets the mimalloc options before mimalloc starts: an arena reserved at the
/// first allocation keeps the options it was made with, so `main` is too late.
/// An ELF constructor of priority 100 runs before mimalloc's own (101) and
/// before any Rust code allocates.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00100"]
static SET_MIMALLOC_OPTIONS: extern "C" fn() = set_mimalloc_options;

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
extern "C" fn set_mimalloc_options() {
    for (option, variable, value) in MIMALLOC_OPTIONS {
        // getenv, not std::env: nothing may allocate before the options are set.
        // SAFETY: getenv reads the environment with a NUL-terminated name, and
        // mi_option_set sets one number of mimalloc's option table by its index.
        unsafe {
            if libc::getenv(variable.as_ptr()).is_null() {
                libmimalloc_sys::mi_option_set(option, value);
            }
        }
    }
}

/// Applies the glibc tuning; call first thing in `main`.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, c_void, CStr};

    extern "C" {
        /// mimalloc.h: writes the version and every option as `option 'name': value`.
        fn mi_options_print_out(out: libmimalloc_sys::mi_output_fun, arg: *mut c_void);
    }

    unsafe extern "C" fn collect(message: *const c_char, arg: *mut c_void) {
        // SAFETY: `arg` is the String passed below; mimalloc passes a C string.
        unsafe { (*arg.cast::<String>()).push_str(&CStr::from_ptr(message).to_string_lossy()) };
    }

    /// The options hold from the start of the process (this test binary links
    /// the library too), under the names they are meant for, unless a
    /// `MIMALLOC_*` variable of the environment set one.
    #[cfg(target_os = "linux")]
    #[test]
    fn mimalloc_runs_with_the_tuned_options_from_the_start() {
        let mut printed = String::new();
        // SAFETY: `collect` only appends to `printed`, which outlives the call.
        unsafe { mi_options_print_out(Some(collect), (&raw mut printed).cast()) };
        for (name, variable, value) in [
            ("arena_max_object_size", "MIMALLOC_ARENA_MAX_OBJECT_SIZE", "4096 KiB"),
            ("purge_delay", "MIMALLOC_PURGE_DELAY", "100"),
            ("arena_eager_commit", "MIMALLOC_ARENA_EAGER_COMMIT", "0"),
        ] {
            let line = printed
                .lines()
                .find(|l| l.starts_with(&format!("option '{name}':")))
                .unwrap_or_else(|| panic!("{name} in {printed}"));
            if std::env::var_os(variable).is_none() {
                assert_eq!(line.trim_end(), format!("option '{name}': {value}"));
            }
        }
    }
}
