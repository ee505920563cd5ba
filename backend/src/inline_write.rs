//! Buffered writes done on the queue thread, with `pwritev(2)`, instead of
//! through the io_uring.
//!
//! File systems that cannot start a buffered write without blocking (ext4,
//! among others: `RWF_NOWAIT` gets EOPNOTSUPP) make io_uring hand every
//! buffered write to an io-wq worker thread. Each write then costs a
//! wake-up, a sleep and two context switches on top of its copy into the
//! page cache; in a VM those switches trap to the hypervisor. Copying on the
//! queue thread itself halves the server CPU per write.
//!
//! The price is that a write that blocks (the kernel throttling a writer
//! that dirties pages faster than they are written back, or a partial-page
//! write reading its page from disk) holds up the queue's other requests.
//! So a write that takes longer than a copy should is taken as a sign:
//! the queue's writes go through the io_uring again for [`BACK_OFF`], where
//! a blocked write waits in a worker while reads go on, then inline writes
//! are tried again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::QueueMetrics;
use crate::request::Iov;

/// How long writes go through the io_uring after one blocked.
pub const BACK_OFF: Duration = Duration::from_secs(1);
/// A write slower than this plus [`NS_PER_KIB`] per KiB has blocked.
const SLOW_BASE: Duration = Duration::from_millis(1);
/// A generous copy time per KiB (1 µs: 1 GB/s, a tenth of a core's copy).
const NS_PER_KIB: u64 = 1000;

/// One queue's inline writes to one descriptor.
pub struct InlineWrites {
    /// A descriptor of its own for the image, so that it stays open as
    /// long as the queue does (the io_uring holds its registered file).
    file: File,
    /// Writes go through the io_uring until then.
    backed_off: Option<Instant>,
    /// Base of the slowness threshold (tests lower it).
    slow_base: Duration,
    /// The queue's counters: blocked writes are counted there.
    metrics: Arc<QueueMetrics>,
}

impl InlineWrites {
    /// Inline writes to `file`, a buffered (not `O_DIRECT`) regular file
    /// or block device, for the queue that owns `metrics`.
    pub fn new(file: &File, metrics: Arc<QueueMetrics>) -> io::Result<Self> {
        Ok(InlineWrites {
            file: file.try_clone()?,
            backed_off: None,
            slow_base: SLOW_BASE,
            metrics,
        })
    }

    /// Writes `iovs` at `offset` now and returns the result (bytes, or a
    /// negative errno), or `None` if writes are backed off: the caller then
    /// submits the write to the io_uring.
    ///
    /// # Safety
    /// Each iov must be readable for its length for the whole call.
    pub unsafe fn write(&mut self, offset: u64, iovs: &[Iov]) -> Option<i64> {
        let start = Instant::now();
        if let Some(until) = self.backed_off {
            if start < until {
                return None;
            }
            self.backed_off = None;
        }
        let len: usize = iovs.iter().map(|i| i.len()).sum();
        let res = loop {
            // SAFETY: `Iov` has the layout of `struct iovec` (it is what the
            // io_uring is given), the caller guarantees the buffers, and the
            // count comes from the slice.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    iovs.as_ptr().cast(),
                    iovs.len().min(libc::c_int::MAX as usize) as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if n >= 0 {
                break n as i64;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break -i64::from(e.raw_os_error().unwrap_or(libc::EIO));
            }
        };
        let slow = self.slow_base + Duration::from_nanos(NS_PER_KIB * (len as u64 >> 10));
        let now = Instant::now();
        let took = now.duration_since(start);
        if took > slow {
            self.backed_off = Some(now + BACK_OFF);
            self.metrics.blocked_write();
            tracing::debug!(
                took_us = took.as_micros() as u64,
                len,
                "a buffered write blocked; writes go through the io_uring for {BACK_OFF:?}"
            );
        }
        Some(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iov(b: &[u8]) -> Iov {
        // SAFETY: the tests keep `b` alive while the iov is used.
        unsafe { Iov::new(b.as_ptr().cast_mut(), b.len()) }
    }

    #[test]
    fn writes_land_and_a_slow_one_backs_off() {
        let file = tempfile::tempfile().unwrap();
        let mut w = InlineWrites::new(&file, Arc::default()).unwrap();
        let (a, b) = (vec![0x11u8; 4096], vec![0x22u8; 512]);
        // SAFETY: a and b outlive the call.
        assert_eq!(unsafe { w.write(512, &[iov(&a), iov(&b)]) }, Some(4608));
        let mut back = vec![0u8; 4608];
        file.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(&back[..4096], &a[..]);
        assert_eq!(&back[4096..], &b[..]);
        assert_eq!(w.metrics.blocked_writes.get(), 0);

        // Every write counts as slow now: the next one is still done, then
        // the queue backs off to the io_uring.
        w.slow_base = Duration::ZERO;
        // SAFETY: as above.
        assert_eq!(unsafe { w.write(0, &[iov(&b)]) }, Some(512));
        assert_eq!(w.metrics.blocked_writes.get(), 1);
        // SAFETY: as above.
        assert_eq!(unsafe { w.write(0, &[iov(&b)]) }, None);
        // Once the back-off is over, inline writes are tried again.
        w.backed_off = Some(Instant::now());
        w.slow_base = SLOW_BASE;
        // SAFETY: as above.
        assert_eq!(unsafe { w.write(0, &[iov(&b)]) }, Some(512));
        assert_eq!(w.metrics.blocked_writes.get(), 1);
    }

    #[test]
    fn errors_come_back_as_negative_errnos() {
        let file = tempfile::tempfile().unwrap();
        let ro = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        let mut w = InlineWrites::new(&ro, Arc::default()).unwrap();
        let b = vec![0u8; 512];
        // SAFETY: b outlives the call.
        let res = unsafe { w.write(0, &[iov(&b)]) };
        assert_eq!(res, Some(-i64::from(libc::EBADF)));
    }
}
