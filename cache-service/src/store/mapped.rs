//! Blob files (stored, or a download's spool below what it wrote) handed to the response
//! straight from the page cache: each window of the file is mapped (its pages read into the
//! page cache first if they are not, on the blocking pool) and becomes a `Bytes` without a copy
//! through a user-space buffer. Every live window is registered with its file and offset, so
//! that the connection writing it to a plain TCP socket can `sendfile` those bytes instead of
//! copying them (see `http::zero_copy`); otherwise hyper's HTTP/1.1 writer hands them to
//! `writev`. The cache listener speaks HTTP/1.1 only and has no TLS, so no user-space code
//! reads a mapping (an HTTP/2 or TLS writer would copy from it, and a truncated file would then
//! be SIGBUS).
//!
//! Mapping (and asking the kernel which mapped pages are in the page cache) is the one `unsafe`
//! operation in the workspace. Its soundness condition is that the mapped bytes do not change
//! or shrink while mapped. A stored blob's file is written once under a temporary name,
//! verified, renamed into place and never opened for writing again; eviction unlinks it, which
//! keeps the mapped pages valid until the last mapping is gone. A download's spool is only
//! appended to, and a window of it is mapped only below the bytes already written (clients
//! reading behind the download). What is left is somebody outside the cache truncating a file
//! in place: the kernel's copy to the socket then fails with `EFAULT`, or `sendfile` finds the
//! file's end early, and the response is cut short (which the client detects by its length).
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

/// A file region `[offset, offset + len)` whose bytes are a live window's mapped memory (the
/// window's address is its key in [`windows`]).
#[derive(Debug, Clone)]
pub(crate) struct Region {
    pub(crate) file: Arc<File>,
    pub(crate) offset: u64,
    len: usize,
}

/// Live windows by the address their mapping starts at (mappings never overlap).
fn windows() -> &'static Mutex<BTreeMap<usize, Region>> {
    static W: OnceLock<Mutex<BTreeMap<usize, Region>>> = OnceLock::new();
    W.get_or_init(Mutex::default)
}

/// The file and offset behind `len` bytes at `ptr`, if they lie in one live window.
pub(crate) fn region_of(ptr: *const u8, len: usize) -> Option<(Arc<File>, u64)> {
    let addr = ptr as usize;
    let w = crate::lock(windows());
    let (&start, r) = w.range(..=addr).next_back()?;
    let within = addr - start;
    (within.checked_add(len)? <= r.len).then(|| (r.file.clone(), r.offset + within as u64))
}

/// One mapped window, registered while it lives.
struct Window {
    map: memmap2::Mmap,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // Deregistered before the mapping goes (the fields drop after this body).
        crate::lock(windows()).remove(&(self.map.as_ptr() as usize));
    }
}

/// The bytes `[pos, pos + len)` of `file`, mapped read-only with their pages in the page cache.
/// Blocks on disk reads: call it on the blocking pool.
pub(crate) fn window(file: &Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let map_with = |populate: bool| {
        let mut options = memmap2::MmapOptions::new();
        options.offset(pos).len(len);
        if populate {
            options.populate();
        }
        // SAFETY: see the module comment: a stored blob, and a spool below what was written,
        // never change while the cache runs.
        unsafe { options.map(&**file) }
    };
    // A warm blob's pages are in the page cache already, and `sendfile` reads them from there:
    // page-table entries for them would cost more CPU to set up and tear down than sending
    // the bytes. Only pages that are still on disk are read in, here and not in `sendfile`
    // on a runtime thread.
    let mut map = map_with(false)?;
    if !all_in_page_cache(file, pos, &map) {
        map = map_with(true)?;
    }
    crate::lock(windows()).insert(
        map.as_ptr() as usize,
        Region {
            file: file.clone(),
            offset: pos,
            len: map.len(),
        },
    );
    Ok(Bytes::from_owner(Window { map }))
}

/// Whether every page of `map`, the bytes at `pos` of `file`, is in the page cache.
/// `cachestat` (Linux 6.5+) counts them in one walk of the file's cache, an order of
/// magnitude cheaper than `mincore`, which looks up each page of the mapping; `mincore`
/// answers where `cachestat` is missing or refused.
fn all_in_page_cache(file: &File, pos: u64, map: &memmap2::Mmap) -> bool {
    match cached_pages(file, pos, map.len()) {
        Some((cached, pages)) => cached >= pages,
        None => mapped_pages_in_page_cache(map).unwrap_or(false),
    }
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf reads a constant of the system.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => usize::try_from(n).unwrap_or(4096),
        _ => 4096,
    })
}

/// `cachestat`'s number in the kernel's common syscall table (the `libc` crate has it for
/// some targets only).
const SYS_CACHESTAT: libc::c_long = 451;

/// `(pages in the page cache, pages)` of the `len > 0` bytes at `pos` of `file`, by
/// `cachestat`; `None` where the kernel has no `cachestat` or refuses it for this file (newer
/// kernels answer only for files the caller may write or owns, as a stored blob's is).
fn cached_pages(file: &File, pos: u64, len: usize) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    /// `struct cachestat_range` of the kernel's uapi.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// `struct cachestat` of the kernel's uapi.
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    static MISSING: AtomicBool = AtomicBool::new(false);
    if MISSING.load(Relaxed) || len == 0 {
        return None;
    }
    let range = Range {
        off: pos,
        len: len as u64,
    };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live values of the layouts the kernel reads and writes.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            MISSING.store(true, Relaxed);
        }
        return None;
    }
    let page = page_size() as u64;
    let pages = (pos + len as u64 - 1) / page - pos / page + 1;
    Some((stat.nr_cache, pages))
}

/// Whether every page of `map` is in the page cache (`mincore`). The kernel reports every
/// page as present for a file the process could neither write nor owns: such a window is
/// sent as if warm, and `sendfile` reads what is missing.
fn mapped_pages_in_page_cache(map: &memmap2::Mmap) -> io::Result<bool> {
    let page = page_size();
    let start = map.as_ptr() as usize;
    // The mapping begins at the page holding its first byte (mmap maps whole pages).
    let from = start - start % page;
    let len = map.len() + (start - from);
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: `[from, from + len)` lies within this live mapping, and `pages` has one byte
    // for each of its pages, as mincore writes.
    let r = unsafe { libc::mincore(from as *mut libc::c_void, len, pages.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pages.iter().all(|p| p & 1 == 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_live_window_names_its_file_region_and_a_dropped_one_nothing() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        tmp.write_all(&content).unwrap();
        let file = Arc::new(File::open(tmp.path()).unwrap());
        let w = window(&file, 4096, 8192).unwrap();
        assert_eq!(&w[..], &content[4096..]);
        let part = w.slice(100..200);
        let (_, offset) = region_of(part.as_ptr(), part.len()).unwrap();
        assert_eq!(offset, 4096 + 100);
        assert!(region_of(part.as_ptr(), 8192).is_none(), "past the window");
        let other = Bytes::from(vec![0u8; 10]);
        assert!(region_of(other.as_ptr(), 10).is_none(), "ordinary memory");
        let addr = w.as_ptr();
        drop((w, part));
        assert!(region_of(addr, 1).is_none(), "dropped");
    }

    /// `len` bytes at `pos` of `file`, mapped.
    fn map(file: &File, pos: u64, len: usize) -> memmap2::Mmap {
        // SAFETY: the tests' files are not changed while mapped.
        unsafe {
            memmap2::MmapOptions::new()
                .offset(pos)
                .len(len)
                .map(file)
                .unwrap()
        }
    }

    #[test]
    fn a_written_file_is_in_the_page_cache_at_any_offset() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![7u8; 5 * 4096]).unwrap();
        let file = File::open(tmp.path()).unwrap();
        for (pos, len) in [(0, 5 * 4096), (4096, 4096), (100, 3 * 4096 + 1)] {
            let map = map(&file, pos, len);
            assert!(mapped_pages_in_page_cache(&map).unwrap(), "{pos}+{len}");
            assert!(all_in_page_cache(&file, pos, &map), "{pos}+{len}");
        }
    }

    #[test]
    fn cachestat_and_mincore_agree_on_pages_dropped_from_the_page_cache_and_read_back() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![9u8; 8 * 4096]).unwrap();
        tmp.as_file().sync_all().unwrap();
        let file = File::open(tmp.path()).unwrap();
        let agree = |what: &str| -> bool {
            let mut all = true;
            for (pos, len) in [(0u64, 8 * 4096usize), (0, 2 * 4096), (3 * 4096 + 7, 4096)] {
                let map = map(&file, pos, len);
                let by_mincore = mapped_pages_in_page_cache(&map).unwrap();
                // `None` only on a kernel without cachestat (before 6.5): mincore answers.
                if let Some((cached, pages)) = cached_pages(&file, pos, len) {
                    assert_eq!(
                        cached >= pages,
                        by_mincore,
                        "{what} {pos}+{len}: {cached}/{pages}"
                    );
                }
                assert_eq!(all_in_page_cache(&file, pos, &map), by_mincore, "{what}");
                all &= by_mincore;
            }
            all
        };
        // The clean pages leave the page cache (the whole file: a large folio stays whole)
        // where the filesystem lets them go; tmpfs keeps its pages, and then both say so.
        // SAFETY: plain advice on an open descriptor.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        agree("dropped");
        std::fs::read(tmp.path()).unwrap();
        assert!(
            agree("read back"),
            "every page is in the page cache after a read"
        );
    }
}
