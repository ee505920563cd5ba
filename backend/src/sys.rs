//! Small wrappers over system facilities: vmm-sys-util's timerfd and
//! eventfd as the workers use them, shared mappings of frontend files, and
//! signal handlers that take the fault's details.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// A monotonic timer a queue worker wakes up on for deferred (throttled)
/// requests: vmm-sys-util's timerfd, non-blocking, remembering when it is
/// armed for so that a later deadline never postpones an earlier one.
pub struct Timer {
    fd: vmm_sys_util::timerfd::TimerFd,
    armed_for: Option<Instant>,
}

impl Timer {
    pub fn new() -> io::Result<Self> {
        let fd = vmm_sys_util::timerfd::TimerFd::new().map_err(io::Error::from)?;
        // A consume after a spurious wake-up must not block the queue thread.
        // SAFETY: F_SETFL on a descriptor we own changes no memory.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Timer {
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
        self.fd.reset(delay, None).map_err(io::Error::from)?;
        self.armed_for = Some(when);
        Ok(())
    }

    /// Consumes an expiry (after epoll reported the fd readable).
    pub fn consume(&mut self) {
        let _ = self.fd.wait();
        self.armed_for = None;
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The eventfd io_uring signals when completions are posted.
pub fn completion_eventfd() -> io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
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

/// A signal handler that gets the signal's `siginfo_t` (`SA_SIGINFO`).
pub type SiginfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `signal`, process-wide, with an empty mask.
/// The handler must do only what is async-signal-safe.
pub fn install_siginfo_handler(signal: libc::c_int, handler: SiginfoHandler) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set a handler with the
    // SA_SIGINFO signature and an empty mask, and pass valid pointers.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(signal, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A folder held open by descriptor, for making and removing names in it
/// with `openat` and `unlinkat` (which seccomp can tell apart by the
/// descriptor, see `seccomp::FileRights`). A symlink to a folder is
/// followed once, when it is opened: the descriptor then pins the folder.
#[derive(Debug)]
pub struct HeldDir {
    fd: std::os::fd::OwnedFd,
    path: std::path::PathBuf,
}

impl HeldDir {
    pub fn open(path: &std::path::Path) -> io::Result<HeldDir> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)?;
        Ok(HeldDir {
            fd: f.into(),
            path: path.into(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The path it was opened by, for messages.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether `other` names this very folder (device and inode).
    pub fn is(&self, other: &std::path::Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: an all-zero stat is a valid value; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on our own open descriptor, into our buffer.
        if unsafe { libc::fstat(self.fd(), &mut st) } != 0 {
            return false;
        }
        std::fs::metadata(other).is_ok_and(|m| (m.dev(), m.ino()) == (st.st_dev, st.st_ino))
    }

    /// Creates `name` in the folder: it must not exist, and a symlink
    /// there is not followed (`O_CREAT|O_EXCL|O_NOFOLLOW`), write-only.
    pub fn create_new(&self, name: &std::ffi::CStr, mode: u32) -> io::Result<std::fs::File> {
        use std::os::fd::FromRawFd;
        // SAFETY: a valid folder descriptor and a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                self.fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    /// Removes `name` from the folder (not what a symlink there points to).
    pub fn remove(&self, name: &std::ffi::CStr) -> io::Result<()> {
        // SAFETY: a valid folder descriptor and a NUL-terminated name.
        if unsafe { libc::unlinkat(self.fd(), name.as_ptr(), 0) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A name in a folder held open (see [`HeldDir`]), to be removed later
/// whatever the process's rights over paths by then.
#[derive(Debug)]
pub struct NameInDir {
    dir: HeldDir,
    name: std::ffi::CString,
    path: std::path::PathBuf,
}

impl NameInDir {
    /// Opens `path`'s folder; `path` must end in a file name.
    pub fn new(path: &std::path::Path) -> io::Result<NameInDir> {
        use std::os::unix::ffi::OsStrExt;
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        Ok(NameInDir {
            dir: HeldDir::open(parent)?,
            name: std::ffi::CString::new(name.as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the name"))?,
            path: path.into(),
        })
    }

    /// The folder's descriptor.
    pub fn dir_fd(&self) -> RawFd {
        self.dir.fd()
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Removes the name (not what a symlink there points to).
    pub fn remove(&self) -> io::Result<()> {
        self.dir.remove(&self.name)
    }
}
