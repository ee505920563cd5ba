//! In-flight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a region of
//! shared memory in which each queue records the requests it has taken from
//! the ring and not yet returned, so that a restarted vmcrypt resubmits them
//! and never returns a request twice.
//!
//! The frontend keeps the region (a memfd this backend allocated on
//! `GET_INFLIGHT_FD`) across a backend crash and hands it back with
//! `SET_INFLIGHT_FD`. Each queue's part is laid out as QEMU's libvhost-user
//! and DPDK lay out split rings:
//!
//! ```text
//! header: u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc_num entries: u8 inflight | u8 padding[5] | u16 next | u64 counter
//! ```
//!
//! The protocol, per queue:
//! - taking head `h`: `desc[h].counter = n++`, then `desc[h].inflight = 1`;
//! - returning it: `last_batch_head = h`, publish the used element,
//!   `desc[h].inflight = 0`, then `used_idx` = the ring's used index;
//! - on start with a used region: a region `used_idx` other than the ring's
//!   means the crash fell between publishing and clearing, so the last batch's
//!   head is cleared; every head still marked is resubmitted, oldest first,
//!   and the ring's next available index is its used index plus their number.
//!
//! A region of version 0 is fresh (QEMU frees the region on a device reset):
//! it is initialised and nothing is resubmitted.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

use crate::sys::SharedMap;

const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
/// Each queue's part starts on a cache line.
const QUEUE_ALIGN: usize = 64;
/// Largest virtqueue (virtio 1.2: split rings up to 32768 entries).
const MAX_QUEUE_SIZE: u16 = 32768;

/// Why a region could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("in-flight region: {0}")]
    Invalid(String),
    #[error("in-flight region: {what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
}

impl From<InflightError> for io::Error {
    fn from(e: InflightError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

fn sys(what: &'static str) -> InflightError {
    InflightError::Sys {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Bytes of one queue's part of the region.
fn queue_stride(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// The whole region, mapped into this process.
#[derive(Debug)]
pub struct InflightRegion {
    map: SharedMap,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Allocates a zeroed region for `num_queues` queues of `queue_size`
    /// descriptors (`GET_INFLIGHT_FD`): a sealed memfd, returned with its
    /// description for the frontend.
    pub fn allocate(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Arc<Self>, File, VhostUserInflight), InflightError> {
        check_geometry(num_queues, queue_size)?;
        let len = queue_stride(queue_size) * usize::from(num_queues);
        // SAFETY: the name is a NUL-terminated literal; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"vmcrypt-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .map_err(|source| InflightError::Sys {
                what: "sizing the memfd",
                source,
            })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a valid descriptor with integer arguments.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(sys("sealing the memfd"));
        }
        let msg = VhostUserInflight {
            mmap_size: len as u64,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let region = Self::map(&file, &msg)?;
        Ok((region, file, msg))
    }

    /// Maps a region the frontend hands over (`SET_INFLIGHT_FD`), after
    /// checking that its description fits the file.
    pub fn open(msg: &VhostUserInflight, file: &File) -> Result<Arc<Self>, InflightError> {
        check_geometry(msg.num_queues, msg.queue_size)?;
        let need = (queue_stride(msg.queue_size) * usize::from(msg.num_queues)) as u64;
        if msg.mmap_size < need {
            return Err(InflightError::Invalid(format!(
                "{} bytes do not hold {} queues of {} descriptors ({need} bytes)",
                msg.mmap_size, msg.num_queues, msg.queue_size
            )));
        }
        Self::map(file, msg)
    }

    fn map(file: &File, msg: &VhostUserInflight) -> Result<Arc<Self>, InflightError> {
        let map = SharedMap::new(file, msg.mmap_offset, msg.mmap_size).map_err(|source| {
            InflightError::Sys {
                what: "mapping the region",
                source,
            }
        })?;
        Ok(Arc::new(InflightRegion {
            map,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        }))
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue `q`'s part of the region.
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<QueueInflight> {
        if q >= usize::from(self.num_queues) {
            return None;
        }
        Some(QueueInflight {
            // SAFETY: q < num_queues, and `open` checked that the mapping
            // holds num_queues parts.
            base: unsafe { self.map.as_ptr().add(q * queue_stride(self.queue_size)) },
            desc_num: self.queue_size,
            _region: self.clone(),
        })
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Invalid(format!(
            "unusable geometry: {num_queues} queues of {queue_size} descriptors"
        )));
    }
    Ok(())
}

/// What a queue finds in its part of the region when it starts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (first start, or after a device reset): the
    /// frontend's ring state stands as it is.
    pub fresh: bool,
    /// Heads taken but not returned before the restart, oldest first.
    pub resubmit: Vec<u16>,
    /// The counter to give the next head taken.
    pub next_counter: u64,
}

/// One queue's part of the region.
#[derive(Debug)]
pub struct QueueInflight {
    base: *mut u8,
    desc_num: u16,
    /// Keeps the mapping alive.
    _region: Arc<InflightRegion>,
}

// SAFETY: see InflightRegion; a QueueInflight is used by its queue's worker.
unsafe impl Send for QueueInflight {}

impl QueueInflight {
    /// Descriptors this part tracks: heads must be below it.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: off is one of the header's 2-byte-aligned u16 fields, inside
        // the mapping (alive as long as self); the memory is only accessed atomically.
        unsafe { &*self.base.add(off).cast::<AtomicU16>() }
    }

    fn version(&self) -> &AtomicU16 {
        self.u16_at(8)
    }
    fn header_desc_num(&self) -> &AtomicU16 {
        self.u16_at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.u16_at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(14)
    }

    /// Callers check `head < desc_num`.
    fn inflight(&self, head: u16) -> &AtomicU8 {
        assert!(head < self.desc_num);
        // SAFETY: head < desc_num, so the entry lies inside this queue's part.
        unsafe {
            &*self
                .base
                .add(HEADER_LEN + DESC_LEN * usize::from(head))
                .cast()
        }
    }

    /// Callers check `head < desc_num`.
    fn counter(&self, head: u16) -> &AtomicU64 {
        assert!(head < self.desc_num);
        // SAFETY: as in `inflight`; the field is at offset 8 of a 16-byte
        // entry in a 64-byte-aligned part, so it is 8-byte aligned.
        unsafe {
            &*self
                .base
                .add(HEADER_LEN + DESC_LEN * usize::from(head) + 8)
                .cast()
        }
    }

    /// Reads the region when the queue starts, given the ring's used index.
    pub fn recover(&self, ring_used: u16) -> Result<Recovery, InflightError> {
        if self.version().load(Ordering::Acquire) == 0 {
            // Fresh region: nothing was in flight.
            for h in 0..self.desc_num {
                self.inflight(h).store(0, Ordering::Relaxed);
                self.counter(h).store(0, Ordering::Relaxed);
            }
            self.header_desc_num()
                .store(self.desc_num, Ordering::Relaxed);
            self.last_batch_head().store(0, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            return Ok(Recovery {
                fresh: true,
                resubmit: Vec::new(),
                next_counter: 1,
            });
        }
        let n = self.header_desc_num().load(Ordering::Acquire);
        if n != self.desc_num {
            return Err(InflightError::Invalid(format!(
                "region tracks {n} descriptors per queue, the frontend says {}",
                self.desc_num
            )));
        }
        if self.used_idx().load(Ordering::Acquire) != ring_used {
            // Stopped between publishing a used element and clearing its
            // entry: that head is complete.
            let h = self.last_batch_head().load(Ordering::Acquire);
            if h < self.desc_num {
                self.inflight(h).store(0, Ordering::Release);
            }
            self.used_idx().store(ring_used, Ordering::Release);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter(h).load(Ordering::Acquire), h))
            .collect();
        marked.sort_unstable();
        let next_counter = marked.last().map_or(1, |&(c, _)| c + 1);
        Ok(Recovery {
            fresh: false,
            resubmit: marked.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        })
    }

    /// The region is handed over while `in_flight` heads of this queue run
    /// (`SET_INFLIGHT_FD` mid-stream): whatever it held is of no run of
    /// this ring; it starts afresh with those heads marked. Returns the
    /// next counter.
    pub fn adopt(&self, ring_used: u16, in_flight: &[u16]) -> u64 {
        self.version().store(0, Ordering::Release);
        let _ = self.recover(ring_used);
        for (i, &h) in in_flight.iter().enumerate() {
            self.take(h, i as u64 + 1);
        }
        in_flight.len() as u64 + 1
    }

    /// Records head `head` as taken from the ring, as the `counter`-th.
    /// Heads outside the region are not tracked (the worker refuses queues
    /// larger than the region).
    pub fn take(&self, head: u16, counter: u64) {
        if head < self.desc_num {
            self.counter(head).store(counter, Ordering::Relaxed);
            self.inflight(head).store(1, Ordering::Release);
        }
    }

    /// Before publishing head `head`'s used element.
    pub fn begin_return(&self, head: u16) {
        self.last_batch_head().store(head, Ordering::Release);
    }

    /// After publishing head `head`'s used element; `used_idx` is the ring's
    /// used index now.
    pub fn end_return(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.inflight(head).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.used_idx().store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (Arc<InflightRegion>, File, VhostUserInflight) {
        InflightRegion::allocate(queues, size).unwrap()
    }

    #[test]
    fn a_fresh_region_resubmits_nothing() {
        let (r, _f, msg) = region(2, 8);
        assert_eq!(msg.mmap_size, 2 * 192);
        let q = r.queue(1).unwrap();
        assert_eq!(
            q.recover(5).unwrap(),
            Recovery {
                fresh: true,
                resubmit: vec![],
                next_counter: 1
            }
        );
        // Once initialised, a restart with nothing in flight resubmits nothing.
        assert_eq!(
            q.recover(5).unwrap(),
            Recovery {
                fresh: false,
                resubmit: vec![],
                next_counter: 1
            }
        );
        assert!(r.queue(2).is_none());
    }

    /// What a restarted daemon sees after the frontend hands the region back.
    fn reopen(f: &File, msg: &VhostUserInflight, q: usize) -> QueueInflight {
        InflightRegion::open(msg, f).unwrap().queue(q).unwrap()
    }

    #[test]
    fn heads_in_flight_are_resubmitted_oldest_first() {
        let (r, f, msg) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0).unwrap();
        // Taken in the order 5, 2, 7, 0; 2 completes (used index 0 -> 1).
        for (n, h) in [5u16, 2, 7, 0].into_iter().enumerate() {
            q.take(h, n as u64 + 1);
        }
        q.begin_return(2);
        q.end_return(2, 1);
        drop(q);
        drop(r);
        let q = reopen(&f, &msg, 0);
        assert_eq!(
            q.recover(1).unwrap(),
            Recovery {
                fresh: false,
                resubmit: vec![5, 7, 0],
                next_counter: 5
            }
        );
    }

    #[test]
    fn a_head_published_before_the_crash_is_not_resubmitted() {
        let (r, f, msg) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0).unwrap();
        q.take(3, 1);
        q.take(4, 2);
        // The used element for 4 reached the ring (used index 1), then the
        // daemon died before clearing the entry.
        q.begin_return(4);
        drop(q);
        drop(r);
        let q = reopen(&f, &msg, 0);
        assert_eq!(q.recover(1).unwrap().resubmit, vec![3]);
        // The fix-up is recorded: a second start agrees.
        assert_eq!(q.recover(1).unwrap().resubmit, vec![3]);
    }

    #[test]
    fn an_unpublished_return_is_resubmitted() {
        let (r, _f, _msg) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(7).unwrap();
        q.take(1, 1);
        // Died after naming the batch head but before publishing: the ring's
        // used index is still 7, so head 1 is still in flight.
        q.begin_return(1);
        assert_eq!(q.recover(7).unwrap().resubmit, vec![1]);
    }

    #[test]
    fn bad_descriptions_are_refused() {
        let (_r, f, msg) = region(2, 8);
        let too_small = VhostUserInflight {
            mmap_size: 100,
            ..msg
        };
        assert!(InflightRegion::open(&too_small, &f).is_err());
        let beyond = VhostUserInflight {
            mmap_offset: 4096,
            ..msg
        };
        assert!(InflightRegion::open(&beyond, &f).is_err());
        let no_queues = VhostUserInflight {
            num_queues: 0,
            ..msg
        };
        assert!(InflightRegion::open(&no_queues, &f).is_err());
        assert!(InflightRegion::allocate(1, 0).is_err());
        assert!(InflightRegion::allocate(1, 40000).is_err());
        // A region made for another queue size.
        let (r, f, msg) = region(1, 8);
        r.queue(0).unwrap().recover(0).unwrap();
        let other = VhostUserInflight {
            queue_size: 4,
            ..msg
        };
        let q = InflightRegion::open(&other, &f).unwrap().queue(0).unwrap();
        assert!(q.recover(0).is_err());
    }
}
