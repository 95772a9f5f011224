//! Stored blobs handed to the response straight from the page cache: each window of the file is
//! mapped (and faulted in on the blocking pool) and becomes a `Bytes` without a copy through a
//! user-space buffer, so the socket write is the only copy, as with `sendfile`.
//!
//! Mapping is the one `unsafe` operation in the workspace. Its soundness condition is that the
//! mapped bytes do not change or shrink while mapped. A stored blob's file is written once under
//! a temporary name, verified, renamed into place and never opened for writing again; eviction
//! unlinks it, which keeps the mapped pages valid until the last mapping is gone. What is left is
//! somebody outside the cache truncating a blob in place: the kernel's copy to the socket then
//! fails with `EFAULT` (the response is cut short, which the client detects by its length), and
//! no code of ours reads the mapped memory itself.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use bytes::Bytes;

/// The bytes `[pos, pos + len)` of `file`, mapped read-only with their pages already resident.
/// Blocks on disk reads: call it on the blocking pool.
pub(crate) fn window(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: see the module comment: a stored blob is immutable while the cache runs, and the
    // mapping is only read by the kernel (socket writes), never dereferenced here.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(pos)
            .len(len)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map))
}
