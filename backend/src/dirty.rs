//! Dirty logging of guest memory for live migration (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While QEMU migrates a VM it asks the backend to log every guest page the
//! backend writes, in a bitmap QEMU shares (`SET_LOG_BASE`): bit `n` of the
//! log stands for the 4 KiB guest page at guest physical address `n * 4096`.
//! QEMU sends those pages again before the destination runs.
//!
//! vmcrypt writes guest memory in few places, all in the queue workers: the
//! data of reads (storage, then decryption), GET_ID, status bytes, and the
//! used ring. The worker logs them with [`DirtyLog::mark`] before the used
//! element is published. Guest memory itself carries no bitmap (`()`), so
//! the I/O path pays nothing while no migration runs (see vendor/README.md
//! for what a bitmap in every memory region cost).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

use vhost::vhost_user::message::VhostUserLog;
use vm_memory::GuestAddress;

use crate::sys::SharedMap;

/// Guest page size the log counts in.
const LOG_PAGE: u64 = 4096;

/// The frontend's dirty log, mapped into this process.
#[derive(Debug)]
pub struct DirtyLog(SharedMap);

impl DirtyLog {
    /// Maps the log QEMU hands over with `SET_LOG_BASE`.
    pub fn map(log: &VhostUserLog, file: &File) -> io::Result<DirtyLog> {
        SharedMap::new(file, log.mmap_offset, log.mmap_size)
            .map(DirtyLog)
            .map_err(|e| io::Error::new(e.kind(), format!("dirty log: {e}")))
    }

    /// Logs `len` bytes of guest memory from `addr` as written. Pages beyond
    /// the log (which covers all guest memory) are ignored.
    pub fn mark(&self, addr: GuestAddress, len: usize) {
        if len == 0 {
            return;
        }
        let first = addr.0 / LOG_PAGE;
        let last = addr.0.saturating_add(len as u64 - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= self.0.len() {
                return;
            }
            // SAFETY: byte < len, inside the mapping; the frontend and
            // other queues update the log concurrently, so only atomically.
            let cell = unsafe { &*self.0.as_ptr().add(byte).cast::<AtomicU8>() };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn log_file(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn bits(f: &File, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn pages_written_are_marked_in_the_shared_file() {
        let f = log_file(8);
        let log = DirtyLog::map(
            &VhostUserLog {
                mmap_size: 8,
                mmap_offset: 0,
            },
            &f,
        )
        .unwrap();
        log.mark(GuestAddress(0x3000), 1); // page 3
        log.mark(GuestAddress(0x7ff0), 0x20); // pages 7 and 8
        log.mark(GuestAddress(0x20000), 0); // nothing
        log.mark(GuestAddress(0x3f000), 4096); // page 63, the last one
        log.mark(GuestAddress(0x40000), 4096); // beyond the log: ignored
        log.mark(GuestAddress(u64::MAX - 10), 100); // no overflow
        assert_eq!(bits(&f, 8), [0x88, 0x01, 0, 0, 0, 0, 0, 0x80]);
    }

    #[test]
    fn logs_beyond_their_file_are_refused() {
        let f = log_file(4096);
        for (size, offset) in [(0, 0), (8192, 0), (4096, 4096), (u64::MAX, 4096)] {
            let log = VhostUserLog {
                mmap_size: size,
                mmap_offset: offset,
            };
            assert!(DirtyLog::map(&log, &f).is_err(), "{size} at {offset}");
        }
    }
}
