//! Thin wrappers over the few raw system calls the crates we use do not cover.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A monotonic timerfd, used by a queue worker to wake up for deferred
/// (throttled) requests.
pub struct TimerFd {
    fd: OwnedFd,
    armed_for: Option<Instant>,
}

impl TimerFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the return value is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by timerfd_create and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TimerFd {
            fd,
            armed_for: None,
        })
    }

    /// Arms the timer to fire at `when` (or right away if that has passed),
    /// unless it is already armed for an earlier time.
    pub fn arm(&mut self, when: Instant) -> io::Result<()> {
        if matches!(self.armed_for, Some(t) if t <= when) {
            return Ok(());
        }
        let delay = when
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: delay.as_secs() as libc::time_t,
                tv_nsec: delay.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: the fd is a valid timerfd; `spec` is a valid itimerspec and
        // the old-value pointer may be null.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_for = Some(when);
        Ok(())
    }

    /// Consumes an expiry (after epoll reported the fd readable).
    pub fn consume(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading at most 8 bytes into an 8-byte stack buffer.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        self.armed_for = None;
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An eventfd that io_uring signals when completions are posted.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the return value is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by no one else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn consume(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading at most 8 bytes into an 8-byte stack buffer.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A read-write shared mapping of part of a file the frontend handed over
/// (the in-flight region, the dirty log): checked to lie inside the file,
/// unmapped when dropped.
#[derive(Debug)]
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a SharedMap is plain shared memory; its users access it only
// through atomics, and it stays mapped until dropped.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `file` from `offset`.
    pub fn new(file: &std::fs::File, offset: u64, len: u64) -> io::Result<SharedMap> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let file_len = file.metadata()?.len();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(invalid(format!(
                "{len} bytes at offset {offset} do not lie inside the file ({file_len} bytes)"
            )));
        }
        let size = usize::try_from(len).map_err(|_| invalid(format!("{len} bytes")))?;
        let off = libc::off_t::try_from(offset).map_err(|_| invalid(format!("offset {offset}")))?;
        // SAFETY: a fresh shared mapping of a range checked to lie inside
        // the file; the kernel rejects an unaligned offset.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            ptr: ptr.cast(),
            len: size,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `new`, unused now
        // that its owner is gone.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
