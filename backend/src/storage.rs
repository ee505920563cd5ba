//! Storage below the filter pipeline: the image file (or a null device),
//! driven by one io_uring per queue so a single worker thread keeps many
//! requests in flight. Buffered writes are the exception: the queue's
//! thread makes them itself ([`crate::inline_write`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use crate::direct::DirectIo;
use crate::inline_write::InlineWrites;
use crate::metrics::QueueMetrics;
use crate::pagecache::PageCacheView;
use crate::request::Iov;
use vmm_sys_util::eventfd::EventFd;

/// Errors opening or using the image.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error(
        "image {path} is in use: another vmcrypt runs a device on it (it holds the image lock)"
    )]
    Locked { path: PathBuf },
    #[error("image {path}: size {size} is not a multiple of the block size {block_size}")]
    Misaligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("image {path} has no data area (empty, or only a header)")]
    Empty { path: PathBuf },
    #[error("cannot set up io_uring (kernel too old or io_uring disabled?): {0}")]
    Uring(io::Error),
    #[error("cannot duplicate the image's descriptor for a queue's writes: {0}")]
    Dup(io::Error),
}

/// The storage a disk is served from.
#[derive(Debug)]
pub enum Image {
    /// Reads return zeroes, writes are dropped.
    Null { capacity: u64 },
    /// A file or block device; the disk starts `data_offset` bytes in.
    File {
        file: File,
        path: PathBuf,
        data_offset: u64,
        capacity: u64,
        /// `--cache none`: the descriptor the queues' io_uring uses.
        direct: Option<DirectIo>,
        /// A read-only mapping for encrypted reads from the page cache.
        view: Option<Arc<PageCacheView>>,
        /// The queues' io_uring instances, made at start (see [`RingPool`]).
        rings: Arc<RingPool>,
    },
    /// A Ceph RBD image, one handle shared by every queue; the disk starts
    /// `data_offset` bytes in (after a LUKS header).
    Rbd {
        rbd: Arc<crate::rbd::RbdImage>,
        data_offset: u64,
    },
}

impl Image {
    /// An opened image whose disk starts `data_offset` bytes in.
    pub fn from_file(
        file: File,
        path: &Path,
        data_offset: u64,
        block_size: u32,
        direct: Option<DirectIo>,
    ) -> Result<Self, StorageError> {
        let size = file_size(&file, path)?.saturating_sub(data_offset);
        if size == 0 {
            return Err(StorageError::Empty { path: path.into() });
        }
        if size % u64::from(block_size) != 0 {
            return Err(StorageError::Misaligned {
                path: path.into(),
                size,
                block_size,
            });
        }
        Ok(Image::File {
            file,
            path: path.into(),
            data_offset,
            capacity: size,
            direct,
            view: None,
            rings: Arc::default(),
        })
    }

    /// Maps the image for reads straight from the page cache (see
    /// `pagecache`), unless it is read with direct I/O. None where that
    /// is not possible; reads then all go through io_uring.
    pub fn map_page_cache(&mut self) -> Option<Arc<PageCacheView>> {
        let Image::File {
            file,
            path,
            data_offset,
            capacity,
            direct: None,
            view,
            ..
        } = self
        else {
            return None;
        };
        match PageCacheView::map(file, *data_offset + *capacity, *data_offset) {
            Ok(v) => {
                let v = Arc::new(v);
                *view = Some(v.clone());
                Some(v)
            }
            Err(e) => {
                tracing::info!(image = %path.display(), "reads from the page cache go through io_uring: cannot map the image: {e}");
                None
            }
        }
    }

    /// The capacity as the image says now (its file's or RBD image's size
    /// read again), for a device start after another daemon had it.
    pub fn current_capacity(&self) -> io::Result<u64> {
        match self {
            Image::Null { capacity } => Ok(*capacity),
            Image::File {
                file,
                path,
                data_offset,
                ..
            } => file_size(file, path)
                .map(|s| s.saturating_sub(*data_offset))
                .map_err(|e| io::Error::other(e.to_string())),
            Image::Rbd { rbd, data_offset } => {
                rbd.refresh()?;
                Ok(rbd.size().saturating_sub(*data_offset))
            }
        }
    }

    pub fn capacity(&self) -> u64 {
        match self {
            Image::Null { capacity } | Image::File { capacity, .. } => *capacity,
            Image::Rbd { rbd, data_offset } => rbd.size().saturating_sub(*data_offset),
        }
    }

    /// Takes the image lock: exclusive for a writable disk, shared for a
    /// read-only one. A daemon that just died may hold it a moment longer
    /// (its io_uring releases the file asynchronously), so this retries
    /// until `wait` has passed.
    pub fn lock(&self, read_only: bool, wait: Duration) -> Result<(), StorageError> {
        if let Image::Rbd { rbd, .. } = self {
            if read_only {
                return Ok(());
            }
            let deadline = Instant::now() + wait;
            loop {
                match rbd.lock_exclusive() {
                    Ok(()) => return Ok(()),
                    Err(e) if Instant::now() >= deadline => {
                        tracing::debug!("RBD exclusive lock: {e}");
                        return Err(StorageError::Locked {
                            path: rbd.spec().to_string().into(),
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let (Some(file), Image::File { path, .. }) = (self.ring_file(), self) else {
            return Ok(());
        };
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock on a valid, open file descriptor; no pointers involved.
            if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StorageError::Locked { path: path.clone() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Drops the image lock.
    pub fn unlock(&self) {
        if let Image::Rbd { rbd, .. } = self {
            rbd.unlock();
        }
        if let Some(file) = self.ring_file() {
            // SAFETY: flock on a valid, open file descriptor.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
    }

    /// The descriptor the queues' rings write through: the `O_DIRECT` one
    /// with `--cache none`, else the image's own. The image lock is taken
    /// on this open file, so it lasts as long as the rings' references to
    /// it: after a SIGKILL the kernel releases a ring's files only once its
    /// requests are done, and until then no successor gets the lock and
    /// writes under a late write of the dead daemon.
    pub fn ring_file(&self) -> Option<&File> {
        match self {
            Image::File {
                direct: Some(d), ..
            } => Some(&d.file),
            Image::File { file, .. } => Some(file),
            _ => None,
        }
    }

    /// What changes when anyone writes the image file: for telling whether
    /// another host wrote it (see `handover`). None for a null device.
    pub fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let Image::File { file, .. } = self else {
            return None;
        };
        let m = file.metadata().ok()?;
        Some(Stamp {
            block_device: m.file_type().is_block_device(),
            network: on_network_fs(file),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Drops the image's clean pages from this host's page cache, so that
    /// what another host wrote while it ran the disk is read afresh.
    pub fn drop_cache(&self) {
        if let Image::File { file, view, .. } = self {
            // Pages mapped into this process would stay.
            if let Some(v) = view {
                v.forget();
            }
            // SAFETY: posix_fadvise on a valid descriptor with integer arguments.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                tracing::debug!(
                    "dropping the image's page cache: {}",
                    io::Error::from_raw_os_error(rc)
                );
            }
        }
    }

    /// Grows the disk to `capacity` bytes: a file image is extended past
    /// its data offset (the new space is a hole), an RBD image is resized
    /// (`rbd_resize`). A block device keeps the size it has, and a null
    /// device has nothing to grow.
    pub fn grow(&self, capacity: u64) -> io::Result<()> {
        use std::os::unix::fs::FileTypeExt;
        let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "size too large");
        if let Image::Rbd { rbd, data_offset } = self {
            return rbd.grow(data_offset.checked_add(capacity).ok_or_else(too_large)?);
        }
        let Image::File {
            file, data_offset, ..
        } = self
        else {
            return Ok(());
        };
        if file.metadata()?.file_type().is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the image is a block device, whose size is its own: grow the device instead",
            ));
        }
        let len = data_offset.checked_add(capacity).ok_or_else(too_large)?;
        file.set_len(len)?;
        file.sync_all()
    }

    /// Makes `dst` a copy of the whole image file that shares its blocks
    /// (a reflink, `FICLONE`): instant, whatever the size. Fails with
    /// `EOPNOTSUPP` (or `EXDEV`, `EINVAL`) where the file system has no
    /// reflinks or `dst` is elsewhere.
    pub fn reflink_to(&self, dst: &File) -> io::Result<()> {
        let Image::File { file, .. } = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only an image file can be copied with a reflink (not a null device or an RBD \
                 image)",
            ));
        };
        reflink(file, dst)
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        match self {
            Image::Null { .. } => Ok(()),
            Image::File { file, .. } => file.sync_data(),
            Image::Rbd { rbd, .. } => rbd.flush(),
        }
    }
}

/// `FICLONE` (<linux/fs.h>: `_IOW(0x94, 9, int)`).
pub const FICLONE: u64 = 0x4004_9409;

/// Makes `dst` share all of `src`'s blocks (see [`Image::reflink_to`]).
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument;
    // both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// See [`Image::stamp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// A block device's times do not change when another host writes it.
    pub block_device: bool,
    /// On a network file system the attributes can come from a cache that
    /// has not seen another host's writes: the stamp tells nothing.
    pub network: bool,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

/// Whether `file` is on a file system other hosts write too, whose
/// attributes this host may see late (NFS, SMB, Ceph, FUSE, cluster file
/// systems).
fn on_network_fs(file: &File) -> bool {
    // SAFETY: an all-zero statfs is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes a statfs into our buffer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        // Unknown: assume the worst (a dropped cache costs only warmth).
        return true;
    }
    is_network_fs(st.f_type as u64)
}

/// The `f_type`s of file systems shared between hosts (<linux/magic.h>).
fn is_network_fs(f_type: u64) -> bool {
    const SHARED: &[u64] = &[
        0x6969,      // NFS
        0x517b,      // SMB
        0xff53_4d42, // CIFS
        0xfe53_4d42, // SMB2
        0x00c3_6400, // Ceph
        0x6573_5546, // FUSE
        0x0116_1970, // GFS2
        0x7461_636f, // OCFS2
        0x0102_1997, // 9P
        0x6b41_4653, // AFS
        0x0bd0_0bd0, // Lustre
        0x4750_4653, // GPFS
        0xaad7_aaea, // PanFS
    ];
    SHARED.contains(&f_type)
}

/// Opens the image (a regular file or a block device). The image lock is
/// not taken here but when a frontend starts the device (see `handover`).
pub fn open(path: &Path, read_only: bool) -> Result<File, StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| StorageError::Open {
            path: path.into(),
            source,
        })?;
    let ft = file
        .metadata()
        .map_err(|source| StorageError::Open {
            path: path.into(),
            source,
        })?
        .file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(StorageError::NotAFile { path: path.into() });
    }
    Ok(file)
}

/// The size of a file or block device in bytes.
pub fn file_size(file: &File, path: &Path) -> Result<u64, StorageError> {
    use std::io::{Seek, SeekFrom};
    let err = |source| StorageError::Open {
        path: path.into(),
        source,
    };
    let meta = file.metadata().map_err(err)?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0)).map_err(err)
    } else {
        Ok(meta.len())
    }
}

/// The storage operation for a request that reached the bottom of the pipeline.
#[derive(Clone, Copy, Debug)]
pub enum IoOp<'a> {
    Read {
        offset: u64,
        iovs: &'a [Iov],
    },
    Write {
        offset: u64,
        iovs: &'a [Iov],
    },
    Flush,
    /// fallocate(2) with `mode` over the range. `zeroes`: the range must
    /// read back as zeroes (WRITE_ZEROES, not DISCARD), for storage that
    /// tells the two apart (RBD).
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
        zeroes: bool,
    },
}

/// One queue's access to the image.
pub enum QueueStorage {
    Null,
    Uring(Pooled),
    Rbd(Box<crate::rbd::RbdQueue>),
}

/// A queue's ring, and the pool it goes back to when dropped (if any).
pub struct Pooled {
    queue: Option<Box<UringQueue>>,
    home: Option<(Arc<RingPool>, usize)>,
}

impl Pooled {
    fn new(ring: Box<UringQueue>, home: Option<(Arc<RingPool>, usize)>) -> Self {
        Pooled {
            queue: Some(ring),
            home,
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = UringQueue;
    fn deref(&self) -> &UringQueue {
        self.queue.as_ref().expect("a ring until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut UringQueue {
        self.queue.as_mut().expect("a ring until dropped")
    }
}

impl Drop for Pooled {
    /// A pooled ring goes back to its pool. The queue's worker drains it
    /// before it is dropped, so nothing is in flight on it.
    fn drop(&mut self) {
        if let (Some(ring), Some((pool, q))) = (self.queue.take(), self.home.take()) {
            if ring.in_flight + ring.pending == 0 {
                pool.give_back(q, ring);
            } else {
                tracing::error!(queue = q, "a ring with requests in flight is not reused");
            }
        }
    }
}

/// The result of handing an operation to storage.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Done already, with this result (bytes or a negative errno).
    Done(i64),
    /// In flight: the result comes back from `reap` with the tag.
    Queued,
}

/// The io_uring instances of a file image's queues, made once at start,
/// before the syscall filter: a running daemon may not create rings
/// (`io_uring_setup` is outside its allow-list), since a ring made later
/// would not carry the restrictions. Each connection's queue takes its
/// ring here and gives it back, drained, when the connection ends.
#[derive(Default)]
pub struct RingPool {
    /// By queue: the ring, or None while a connection's queue has it.
    /// Empty until [`Image::make_rings`] fills it.
    rings: std::sync::Mutex<Vec<Option<Box<UringQueue>>>>,
    returned: std::sync::Condvar,
}

impl std::fmt::Debug for RingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingPool").finish_non_exhaustive()
    }
}

/// How long a new connection's queue waits for the ring of the last one
/// (a control method may still hold that connection's device).
const RING_WAIT: Duration = Duration::from_secs(30);

impl RingPool {
    /// Queue `q`'s ring, waiting for the last connection to give it back;
    /// None if the pool was never filled.
    fn take(&self, q: usize) -> Result<Option<Box<UringQueue>>, StorageError> {
        let deadline = Instant::now() + RING_WAIT;
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        if rings.is_empty() {
            return Ok(None);
        }
        loop {
            if let Some(ring) = rings.get_mut(q).and_then(Option::take) {
                return Ok(Some(ring));
            }
            if q >= rings.len() {
                return Err(StorageError::Uring(io::Error::other(format!(
                    "no io_uring was made for queue {q} at start"
                ))));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StorageError::Uring(io::Error::other(format!(
                    "queue {q}'s io_uring is still in use by the last connection"
                ))));
            }
            rings = self
                .returned
                .wait_timeout(rings, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn give_back(&self, q: usize, mut ring: Box<UringQueue>) {
        ring.backlog.clear();
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = rings.get_mut(q) {
            *slot = Some(ring);
        }
        self.returned.notify_all();
    }
}

impl Image {
    /// Makes the io_uring of each of `queues` queues (`depth` entries;
    /// `metrics` by queue), to be taken by [`QueueStorage::new`]: call it
    /// before the syscall filter is installed. Nothing for a null device
    /// or an RBD image.
    pub fn make_rings(
        &self,
        queues: usize,
        depth: u32,
        metrics: &[Arc<QueueMetrics>],
    ) -> Result<(), StorageError> {
        let Image::File { rings, .. } = self else {
            return Ok(());
        };
        let made = (0..queues)
            .map(|q| {
                let m = metrics.get(q).cloned().unwrap_or_default();
                self.make_ring(depth, m).map(Some)
            })
            .collect::<Result<Vec<_>, _>>()?;
        *rings.rings.lock().unwrap_or_else(|e| e.into_inner()) = made;
        Ok(())
    }

    /// One queue's ring over the descriptor the rings use, with the
    /// buffered writes on the queue's thread unless the image is read with
    /// direct I/O. A file image only.
    fn make_ring(
        &self,
        depth: u32,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Box<UringQueue>, StorageError> {
        let (Some(ring_file), Image::File { file, direct, .. }) = (self.ring_file(), self) else {
            return Err(StorageError::Uring(io::Error::other("not an image file")));
        };
        let mut queue = UringQueue::new(ring_file, depth)?;
        if direct.is_none() {
            queue.inline = Some(InlineWrites::new(file, metrics).map_err(StorageError::Dup)?);
        }
        Ok(Box::new(queue))
    }
}

impl QueueStorage {
    /// Queue `q`'s storage; `metrics` are the queue's counters. A file
    /// image's queue takes the ring made at start ([`Image::make_rings`]),
    /// or makes one where none were (tools and tests, outside the filter).
    pub fn new(
        image: &Arc<Image>,
        q: usize,
        depth: u32,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Self, StorageError> {
        match &**image {
            Image::Null { .. } => Ok(QueueStorage::Null),
            Image::File { rings, .. } => Ok(QueueStorage::Uring(match rings.take(q)? {
                Some(ring) => Pooled::new(ring, Some((rings.clone(), q))),
                None => Pooled::new(image.make_ring(depth, metrics)?, None),
            })),
            Image::Rbd { rbd, .. } => Ok(QueueStorage::Rbd(Box::new(
                crate::rbd::RbdQueue::new(rbd.clone()).map_err(StorageError::Uring)?,
            ))),
        }
    }

    /// Hands `op` to storage; `tag` identifies it in `reap`.
    ///
    /// # Safety
    /// The buffers `op` names (its iovs, and the iovec array itself) must
    /// stay valid and in place until its completion is reaped: the kernel
    /// reads or writes them after this returns.
    pub unsafe fn submit(&mut self, tag: u64, op: IoOp<'_>) -> Submitted {
        match self {
            QueueStorage::Null => Submitted::Done(null_io(op)),
            // SAFETY: forwarded from the caller.
            QueueStorage::Uring(u) => unsafe { u.push(tag, op) },
            // SAFETY: forwarded from the caller.
            QueueStorage::Rbd(r) => unsafe { r.submit(tag, op) },
        }
    }

    /// Starts everything pushed so far, and waits for `wait` completions.
    pub fn kick(&mut self, wait: usize) -> io::Result<()> {
        match self {
            QueueStorage::Null => Ok(()),
            QueueStorage::Uring(u) => u.kick(wait),
            QueueStorage::Rbd(r) => r.wait(wait),
        }
    }

    /// Calls `f(tag, result)` for every completion posted so far.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i64)) {
        if let QueueStorage::Rbd(r) = self {
            r.reap(f);
            return;
        }
        if let QueueStorage::Uring(u) = self {
            let u: &mut UringQueue = u;
            for (tag, res) in u.backlog.drain(..) {
                f(tag, res);
            }
            u.ring.completion().sync();
            while let Some(cqe) = u.ring.completion().next() {
                u.in_flight -= 1;
                f(cqe.user_data(), i64::from(cqe.result()));
            }
        }
    }

    /// Whether completions are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        match self {
            QueueStorage::Null => false,
            QueueStorage::Rbd(r) => r.has_completions(),
            QueueStorage::Uring(u) => {
                if !u.backlog.is_empty() {
                    return true;
                }
                let mut cq = u.ring.completion();
                cq.sync();
                !cq.is_empty()
            }
        }
    }

    /// Whether the queue thread may spin on completions of what is in
    /// flight: true where requests wait at the device (`--cache none`), so
    /// spinning keeps no kernel thread of this host off a CPU; false where
    /// kernel worker threads (buffered io_uring writes) or librbd's threads
    /// do the work and need the CPU.
    pub fn polls_in_flight(&self) -> bool {
        matches!(self, QueueStorage::Uring(u) if u.inline.is_none())
    }

    pub fn in_flight(&self) -> usize {
        match self {
            QueueStorage::Null => 0,
            QueueStorage::Uring(u) => u.in_flight + u.pending,
            QueueStorage::Rbd(r) => r.in_flight(),
        }
    }

    /// The eventfd signalled when completions arrive (none for a null device).
    pub fn completion_fd(&self) -> Option<&EventFd> {
        match self {
            QueueStorage::Null => None,
            QueueStorage::Uring(u) => Some(&u.eventfd),
            QueueStorage::Rbd(r) => Some(r.completion_fd()),
        }
    }
}

/// The null device: reads fill the buffers with zeroes.
fn null_io(op: IoOp<'_>) -> i64 {
    match op {
        IoOp::Read { iovs, .. } => {
            let mut n = 0;
            for iov in iovs {
                // SAFETY: the parser mapped each iov inside guest memory, which
                // the request's memory snapshot keeps mapped; the guest gave
                // these buffers to the device to write.
                unsafe { std::ptr::write_bytes(iov.base(), 0, iov.len()) };
                n += iov.len() as i64;
            }
            n
        }
        IoOp::Write { iovs, .. } => iovs.iter().map(|i| i.len() as i64).sum(),
        IoOp::Flush | IoOp::Fallocate { .. } => 0,
    }
}

/// An io_uring with the image registered as fixed file 0.
pub struct UringQueue {
    ring: IoUring,
    eventfd: EventFd,
    /// Pushed but not yet submitted to the kernel.
    pending: usize,
    in_flight: usize,
    /// Completions moved off a full completion queue so that submission
    /// could go on; `reap` hands them out first.
    backlog: Vec<(u64, i64)>,
    /// Buffered writes done on the queue thread ([`crate::inline_write`]);
    /// none with `--cache none`, where the io_uring does not block.
    inline: Option<InlineWrites>,
}

impl UringQueue {
    /// A ring that can only do the data path's operations on `file`: it is
    /// made disabled, given the image as fixed file 0 and its eventfd, then
    /// restricted (`IORING_REGISTER_RESTRICTIONS`) to read, write, fsync
    /// and fallocate on fixed files, with no further registration, and
    /// only then enabled. A subverted daemon cannot use it to open files
    /// or sockets, which seccomp would not see.
    fn new(file: &File, depth: u32) -> Result<Self, StorageError> {
        use io_uring::register::Restriction;
        use io_uring::squeue::Flags;
        let ring = IoUring::builder()
            .setup_cqsize(depth.max(1) * 2)
            .setup_r_disabled()
            .build(depth.max(1).next_power_of_two())
            .map_err(StorageError::Uring)?;
        let submitter = ring.submitter();
        submitter
            .register_files(&[file.as_raw_fd()])
            .map_err(StorageError::Uring)?;
        let eventfd = crate::sys::completion_eventfd().map_err(StorageError::Uring)?;
        submitter
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(StorageError::Uring)?;
        let mut restrictions = [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            Restriction::sqe_flags_required(Flags::FIXED_FILE.bits()),
        ];
        submitter
            .register_restrictions(&mut restrictions)
            .map_err(StorageError::Uring)?;
        submitter
            .register_enable_rings()
            .map_err(StorageError::Uring)?;
        Ok(UringQueue {
            ring,
            eventfd,
            pending: 0,
            in_flight: 0,
            backlog: Vec::new(),
            inline: None,
        })
    }

    /// # Safety
    /// As [`QueueStorage::submit`].
    unsafe fn push(&mut self, tag: u64, op: IoOp<'_>) -> Submitted {
        if let (IoOp::Write { offset, iovs }, Some(inline)) = (op, self.inline.as_mut()) {
            // SAFETY: the caller keeps the buffers valid until completion,
            // which for an inline write is before this returns.
            if let Some(res) = unsafe { inline.write(offset, iovs) } {
                return Submitted::Done(res);
            }
        }
        let fd = types::Fixed(0);
        let entry = match op {
            IoOp::Read {
                offset,
                iovs: [one],
            } => opcode::Read::new(fd, one.base(), one.len() as u32)
                .offset(offset)
                .build(),
            IoOp::Read { offset, iovs } => {
                opcode::Readv::new(fd, iovs.as_ptr().cast(), iovs.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoOp::Write {
                offset,
                iovs: [one],
            } => opcode::Write::new(fd, one.base(), one.len() as u32)
                .offset(offset)
                .build(),
            IoOp::Write { offset, iovs } => {
                opcode::Writev::new(fd, iovs.as_ptr().cast(), iovs.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fallocate {
                offset, len, mode, ..
            } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
        .user_data(tag);
        loop {
            // SAFETY: the buffers an entry names stay valid until its
            // completion is reaped (the caller's contract on `submit`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.pending += 1;
                return Submitted::Queued;
            }
            // The submission queue is full: start what is there and retry.
            let before = self.pending;
            if let Err(e) = self.kick(0) {
                return Submitted::Done(-i64::from(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            if self.pending == before {
                // The kernel took nothing (EBUSY): its completion queue is
                // full. Move completions aside so it has room; with none to
                // move yet, wait for one.
                if self.move_completions() == 0 {
                    if let Err(e) = self.ring.submit_and_wait(1) {
                        if e.raw_os_error() != Some(libc::EINTR)
                            && e.raw_os_error() != Some(libc::EBUSY)
                        {
                            return Submitted::Done(-i64::from(
                                e.raw_os_error().unwrap_or(libc::EIO),
                            ));
                        }
                    }
                    self.move_completions();
                }
            }
        }
    }

    /// Moves posted completions into the backlog; returns how many.
    fn move_completions(&mut self) -> usize {
        let mut cq = self.ring.completion();
        cq.sync();
        let mut n = 0;
        for cqe in cq {
            self.backlog
                .push((cqe.user_data(), i64::from(cqe.result())));
            n += 1;
        }
        self.in_flight -= n.min(self.in_flight);
        n
    }

    fn kick(&mut self, wait: usize) -> io::Result<()> {
        if self.pending == 0 && wait == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(n) => {
                    self.pending -= n.min(self.pending);
                    self.in_flight += n;
                    if self.pending == 0 || wait > 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue full: the caller reaps, then kicks again.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring does the data path's operations on the image and nothing
    /// else: an OPENAT of /etc/passwd, or a read of another descriptor,
    /// fails in the kernel.
    #[test]
    fn the_ring_refuses_what_the_data_path_never_does() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut q = UringQueue::new(&file, 4).unwrap();
        let mut buf = [0u8; 512];
        let other = std::fs::File::open("/etc/passwd").unwrap();
        let entries = [
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/passwd".as_ptr())
                .build()
                .user_data(1),
            opcode::Read::new(types::Fd(other.as_raw_fd()), buf.as_mut_ptr(), 512)
                .build()
                .user_data(2),
            opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 512)
                .build()
                .user_data(3),
        ];
        for e in &entries {
            // SAFETY: the path and the buffer outlive the ring's work, which
            // is waited for below.
            unsafe { q.ring.submission().push(e).unwrap() };
        }
        // A refused entry may end the submission early: submit until all
        // three have completions.
        let mut results = std::collections::BTreeMap::new();
        while results.len() < 3 {
            let _ = q.ring.submit_and_wait(1);
            for cqe in q.ring.completion() {
                results.insert(cqe.user_data(), cqe.result());
            }
        }
        assert_eq!(results[&1], -libc::EACCES, "OPENAT went through");
        assert_eq!(
            results[&2],
            -libc::EACCES,
            "a read of another fd went through"
        );
        assert_eq!(results[&3], 512);
    }

    /// The file systems whose attribute stamps cannot be trusted to show
    /// another host's writes are told apart from local ones.
    #[test]
    fn network_file_systems_are_recognised() {
        assert!(is_network_fs(0x6969));
        assert!(is_network_fs(0xff53_4d42));
        assert!(is_network_fs(0x00c3_6400));
        assert!(!is_network_fs(0xef53)); // ext4
        assert!(!is_network_fs(0x5846_5342)); // XFS
        let local = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(!on_network_fs(&local));
    }

    /// With `--cache none` the image lock is on the descriptor the rings
    /// write through: a daemon that dies closes its own descriptors, but
    /// the lock stays until its ring lets go of the file (after its last
    /// request), so no successor writes under a late write of the dead one.
    #[test]
    fn with_direct_io_the_lock_lasts_as_long_as_the_rings() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let direct = crate::direct::open(&path, false, 512, 0).unwrap();
        let image = Image::from_file(open(&path, false).unwrap(), &path, 0, 512, Some(direct));
        let image = Arc::new(image.unwrap());
        image.lock(false, Duration::ZERO).unwrap();
        let queue = QueueStorage::new(&image, 0, 4, Arc::default()).unwrap();
        // The daemon's own descriptors close; its ring still has the file.
        drop(image);
        let successor = Image::from_file(open(&path, false).unwrap(), &path, 0, 512, None).unwrap();
        assert!(
            successor.lock(false, Duration::ZERO).is_err(),
            "the lock went with the daemon's descriptors while its ring could still write"
        );
        drop(queue);
        // The ring lets go of the file asynchronously.
        successor.lock(false, Duration::from_secs(10)).unwrap();
    }

    /// More operations than the rings hold, pushed with no reaping in
    /// between: every one is submitted and completes once, with its tag.
    #[test]
    fn pushing_past_full_rings_completes_everything() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut q = UringQueue::new(&file, 2).unwrap();
        let mut bufs = vec![[7u8; 512]; 64];
        let iovs: Vec<[Iov; 1]> = bufs
            .iter_mut()
            .map(|b| {
                // SAFETY: the buffers outlive every operation naming them.
                [unsafe { Iov::new(b.as_mut_ptr(), b.len()) }]
            })
            .collect();
        for (i, iov) in iovs.iter().enumerate() {
            let op = IoOp::Write {
                offset: 512 * i as u64,
                iovs: iov,
            };
            // SAFETY: bufs and iovs live until the end of the test, after
            // every completion is reaped.
            assert_eq!(unsafe { q.push(i as u64, op) }, Submitted::Queued);
        }
        let mut storage = QueueStorage::Uring(Pooled::new(Box::new(q), None));
        let mut seen = vec![0u32; 64];
        while storage.in_flight() > 0 || storage.has_completions() {
            storage.kick(0).unwrap();
            storage.reap(|tag, res| {
                assert_eq!(res, 512);
                seen[tag as usize] += 1;
            });
            if let QueueStorage::Uring(u) = &mut storage {
                if u.in_flight > 0 {
                    let _ = u.ring.submit_and_wait(1);
                }
            }
        }
        assert!(seen.iter().all(|n| *n == 1), "{seen:?}");
    }
}
