//! The binary's allocator settings. The relay allocates a few small buffers
//! per message (row columns, headers, delivery futures); mimalloc serves them
//! with much less CPU than glibc's malloc, which `make bench` profiling
//! showed at ~30% of the relay's time. `main.rs` installs it.

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (include/mimalloc.h);
/// libmimalloc-sys leaves the numbers of such options unnamed.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc hands freed pages back to the OS `purge_delay` ms after they were
/// freed, 1,000 ms by default: a relay that frees a batch every few dozen
/// milliseconds kept memory it no longer used. 100 ms took its peak RSS from
/// 36-40 to 32-34 MiB in drains of 200k rows, CPU within noise (0 gave 27-29
/// MiB for ~10% more CPU). `MIMALLOC_PURGE_DELAY` in the environment wins.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // Safety: called first thing in `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 100) };
}

#[cfg(test)]
mod tests {
    /// Option 15 (`PURGE_DELAY`) is the purge delay: its v3 default is 1,000 ms, which no
    /// other mimalloc option has. Catches a mimalloc update renumbering it.
    #[test]
    fn option_15_is_mimallocs_purge_delay() {
        assert!(
            std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
            "unset MIMALLOC_PURGE_DELAY to run this test"
        );
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) },
            1000
        );
    }
}
