//! Process-wide memory settings for the binaries that run a writer, and the replay tool.
//!
//! Transparent huge pages are turned off for the process. mimalloc asks for
//! huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), so the first touch of
//! each 2 MiB of new heap zeroes all of it in one page fault, on whichever
//! thread touches it, often the writer. On a host that backs guest memory
//! lazily (most VMs), one such fault took up to 30 ms here (about 120 MB/s,
//! against about 1.8 GB/s for the same memory in 4 KiB faults). That is
//! longer than the acknowledgement p99 the ledger aims for. In
//! `taskledger-bench` runs with THP on and off, three pairs, the longest
//! half-rate commit was 100 ms with THP on and 25 ms with it off, and create
//! p99 was 28–47 ms against 10–12 ms.

/// Turns off transparent huge pages for this process (`PR_SET_THP_DISABLE`),
/// for memory mapped before and after the call. Linux only; elsewhere it does
/// nothing.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_process_reports_huge_pages_off() {
        super::disable_transparent_huge_pages().expect("prctl");
        // SAFETY: PR_GET_THP_DISABLE takes no pointers.
        let state = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(state, 1);
    }
}
