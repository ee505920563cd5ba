//! `--cache none`: the image opened with `O_DIRECT`, as QEMU's
//! `cache=none`. No second copy of the disk in the host's page cache,
//! memory use that does not grow with the disk, and no stale cache when a
//! VM moves between hosts on shared storage.
//!
//! Direct I/O needs buffers aligned in memory and lengths and offsets
//! aligned on storage; the kernel says how much (`statx` `STATX_DIOALIGN`).
//! Guest buffers that meet it are used as they are; others go through an
//! aligned bounce buffer ([`AlignedBuf`]), as do all of the encrypt
//! filter's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::request::Iov;

/// Alignment of every buffer vmcrypt allocates for I/O: enough for any
/// direct I/O the kernel asks for here.
pub const BUF_ALIGN: usize = 4096;

/// What direct I/O on the image requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Alignment of a buffer's address in memory.
    pub mem: usize,
    /// Alignment of offsets and lengths on storage.
    pub offset: u64,
}

impl DioAlign {
    /// Whether storage can use these buffers directly.
    pub fn fits(&self, iovs: &[Iov]) -> bool {
        iovs.iter().all(|i| {
            (i.base() as usize).is_multiple_of(self.mem)
                && (i.len() as u64).is_multiple_of(self.offset)
        })
    }
}

/// The image's second descriptor, opened with `O_DIRECT` for the data path
/// (headers and key slots are read through the ordinary one).
#[derive(Debug)]
pub struct DirectIo {
    pub file: File,
    pub align: DioAlign,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("--cache none: cannot open {path} with O_DIRECT: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "--cache none: the file system of {path} does not support direct I/O (tmpfs does not, for one); use --cache writeback"
    )]
    Unsupported { path: PathBuf },
    #[error("--cache none: {path} needs offsets aligned to {align} bytes for direct I/O; {what}")]
    Alignment {
        path: PathBuf,
        align: u64,
        what: String,
    },
}

/// Opens `path` for direct I/O and finds its alignment. `block_size` is
/// the logical block size the guest sees, `data_offset` where its disk
/// starts in the image: both must be aligned for direct I/O.
pub fn open(
    path: &Path,
    read_only: bool,
    block_size: u32,
    data_offset: u64,
) -> Result<DirectIo, DirectError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EINVAL) => DirectError::Unsupported { path: path.into() },
            _ => DirectError::Open {
                path: path.into(),
                source,
            },
        })?;
    let align = dio_align(&file).ok_or_else(|| DirectError::Unsupported { path: path.into() })?;
    let misaligned = |what: String| DirectError::Alignment {
        path: path.into(),
        align: align.offset,
        what,
    };
    if !u64::from(block_size).is_multiple_of(align.offset) {
        return Err(misaligned(format!(
            "the guest's {block_size}-byte blocks are not (use --logical-block-size {})",
            align.offset.max(4096)
        )));
    }
    if !data_offset.is_multiple_of(align.offset) {
        return Err(misaligned(format!(
            "the encrypted payload starts at byte {data_offset}"
        )));
    }
    if align.mem > BUF_ALIGN {
        return Err(DirectError::Alignment {
            path: path.into(),
            align: align.mem as u64,
            what: format!("memory alignment above {BUF_ALIGN} bytes is not supported"),
        });
    }
    Ok(DirectIo { file, align })
}

/// The direct I/O alignment the kernel reports (`STATX_DIOALIGN`, Linux
/// 6.1+), or the logical block size where it does not say; None when the
/// file does not support direct I/O.
fn dio_align(file: &File) -> Option<DioAlign> {
    // SAFETY: an all-zero statx is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes into `st`, which we own; the empty path with
    // AT_EMPTY_PATH names the open descriptor.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0 {
        if st.stx_dio_mem_align == 0 || st.stx_dio_offset_align == 0 {
            return None;
        }
        return Some(DioAlign {
            mem: st.stx_dio_mem_align as usize,
            offset: u64::from(st.stx_dio_offset_align),
        });
    }
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes an int; on a regular file it fails harmlessly.
    let block = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut lbs) } == 0;
    let n = if block && lbs > 0 { lbs as usize } else { 512 };
    Some(DioAlign {
        mem: n,
        offset: n as u64,
    })
}

/// A zero-initialised heap buffer aligned to [`BUF_ALIGN`], resizable
/// (keeping its allocation when it shrinks, for reuse).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer owns its allocation; no shared state.
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new() -> Self {
        AlignedBuf {
            // A dangling, aligned pointer for the empty buffer.
            ptr: NonNull::new(BUF_ALIGN as *mut u8).expect("non-null"),
            len: 0,
            cap: 0,
        }
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = AlignedBuf::new();
        b.resize(len);
        b
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length; new bytes are zero.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            let cap = len.next_multiple_of(BUF_ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, BUF_ALIGN).expect("buffer size");
            // SAFETY: cap > 0 (len > cap >= 0 and rounded up).
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            let Some(p) = NonNull::new(p) else {
                std::alloc::handle_alloc_error(layout);
            };
            // SAFETY: both allocations hold at least self.len bytes and are
            // distinct.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), p.as_ptr(), self.len) };
            self.free();
            self.ptr = p;
            self.cap = cap;
        } else if len > self.len {
            // SAFETY: [self.len, len) lies within the allocation (len <= cap).
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(self.len), 0, len - self.len) };
        }
        self.len = len;
    }

    fn free(&mut self) {
        if self.cap > 0 {
            let layout =
                std::alloc::Layout::from_size_align(self.cap, BUF_ALIGN).expect("buffer size");
            // SAFETY: allocated in `resize` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len bytes from ptr are allocated and initialised (zeroed
        // or written), or len is 0 with an aligned dangling pointer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Copies `iovs` (the guest's buffers, in order) into `dst`.
pub fn gather(iovs: &[Iov], dst: &mut [u8]) {
    let mut at = 0;
    for iov in iovs {
        let n = iov.len().min(dst.len() - at);
        // SAFETY: the iov is readable for len bytes (Iov's contract); dst
        // has room for n more bytes.
        unsafe { std::ptr::copy_nonoverlapping(iov.base(), dst[at..].as_mut_ptr(), n) };
        at += n;
    }
}

/// Copies `src` into `iovs` (the guest's buffers, in order).
pub fn scatter(src: &[u8], iovs: &[Iov]) {
    let mut at = 0;
    for iov in iovs {
        let n = iov.len().min(src.len() - at);
        // SAFETY: the iov is writable for len bytes (Iov's contract); src
        // has n more bytes.
        unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), iov.base(), n) };
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_grow_zeroed_and_stay_aligned() {
        let mut b = AlignedBuf::zeroed(100);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[99] = 7;
        b.resize(10_000);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(b[99], 7);
        assert!(b[100..].iter().all(|&x| x == 0));
        b.resize(10);
        b.resize(200);
        assert!(b[10..].iter().all(|&x| x == 0), "regrown bytes are zero");
        assert_eq!(b.capacity(), 12288);
    }

    #[test]
    fn gather_and_scatter_follow_the_iovs() {
        let mut a = [1u8; 3];
        let mut c = [2u8; 5];
        // SAFETY: a and c outlive the iovs.
        let iovs = unsafe { [Iov::new(a.as_mut_ptr(), 3), Iov::new(c.as_mut_ptr(), 5)] };
        let mut out = [0u8; 8];
        gather(&iovs, &mut out);
        assert_eq!(out, [1, 1, 1, 2, 2, 2, 2, 2]);
        scatter(&[9, 8, 7, 6, 5, 4, 3, 2], &iovs);
        assert_eq!(a, [9, 8, 7]);
        assert_eq!(c, [6, 5, 4, 3, 2]);
        let align = DioAlign {
            mem: 512,
            offset: 512,
        };
        assert!(!align.fits(&iovs));
        let buf = AlignedBuf::zeroed(1024);
        // SAFETY: buf outlives the iov.
        let ok = unsafe { [Iov::new(buf.as_ptr() as *mut u8, 1024)] };
        assert!(align.fits(&ok));
    }
}
