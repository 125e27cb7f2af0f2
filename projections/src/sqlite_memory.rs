//! SQLite's own allocations go through mimalloc, without SQLite's memory statistics.
//!
//! A bulk rebuild is bound by the one SQLite writer thread, and a profile of it had
//! about a fifth of that thread's samples in allocation: glibc's `malloc`/`free`, and
//! the global mutex and `sqlite3MemSize` calls SQLite's memory statistics add to each
//! (`SQLITE_CONFIG_MEMSTATUS`, on by default in the bundled build). The process already
//! allocates with mimalloc (the binaries' global allocator); SQLite is pointed at it too
//! and the statistics, which nothing here reads, are turned off.
//!
//! `sqlite3_config` only works before SQLite initialises, that is before the process's
//! first connection: [`install`] runs once, from `Store::open_sqlite`, and if SQLite was
//! already initialised (another library opened a database first) it changes nothing and
//! SQLite keeps its defaults.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

unsafe extern "C" fn allocate(bytes: c_int) -> *mut c_void {
    // SAFETY: mi_malloc accepts any size; SQLite never asks for a negative one.
    unsafe { libmimalloc_sys::mi_malloc(usize::try_from(bytes).unwrap_or(0)) }
}

unsafe extern "C" fn free(pointer: *mut c_void) {
    // SAFETY: SQLite frees only what `allocate`/`reallocate` returned (or null).
    unsafe { libmimalloc_sys::mi_free(pointer) }
}

unsafe extern "C" fn reallocate(pointer: *mut c_void, bytes: c_int) -> *mut c_void {
    // SAFETY: as in `free`; the size is non-negative.
    unsafe { libmimalloc_sys::mi_realloc(pointer, usize::try_from(bytes).unwrap_or(0)) }
}

unsafe extern "C" fn size(pointer: *mut c_void) -> c_int {
    // SAFETY: as in `free`.
    let usable = unsafe { libmimalloc_sys::mi_usable_size(pointer) };
    c_int::try_from(usable).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn round_up(bytes: c_int) -> c_int {
    // SAFETY: a pure function of its argument.
    let good = unsafe { libmimalloc_sys::mi_good_size(usize::try_from(bytes).unwrap_or(0)) };
    c_int::try_from(good).unwrap_or(bytes)
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn shutdown(_: *mut c_void) {}

/// Points SQLite at mimalloc and turns its memory statistics off, once per process,
/// if SQLite has not initialised yet. Returns whether the allocator was installed.
///
/// `sqlite3_config` is not thread-safe: no other thread may be starting SQLite while it
/// runs, or SQLite could free memory from one allocator with the other. In this crate every
/// connection is opened by `Store::open_sqlite`, which calls this first; another caller (the
/// bench's storage floor, which opens SQLite through `libsqlite3-sys`) must call it before its
/// first connection, with no other thread opening one meanwhile.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(allocate),
            xFree: Some(free),
            xRealloc: Some(reallocate),
            xSize: Some(size),
            xRoundup: Some(round_up),
            xInit: Some(init),
            xShutdown: Some(shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: both calls run once, inside `get_or_init`, before this process's first
        // connection (the caller's); SQLite copies `methods` before returning. After an
        // initialisation elsewhere each returns SQLITE_MISUSE and changes nothing.
        unsafe {
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int);
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods) == ffi::SQLITE_OK
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_allocates_through_mimalloc_without_statistics() {
        let dir = tempfile::tempdir().unwrap();
        // Opening a store installs the allocator (before this process's first connection,
        // whichever test opens a store first).
        let store = crate::store::Store::open_sqlite(dir.path().join("p.sqlite")).await.unwrap();
        assert!(install(), "SQLite had initialised before the first store opened");
        crate::query::checkpoints(&store, 0).await.unwrap();
        // SAFETY: a read of SQLite's global counter, which stays 0 without statistics.
        assert_eq!(unsafe { ffi::sqlite3_memory_used() }, 0, "memory statistics are still kept");
        store.close().await;
    }
}
