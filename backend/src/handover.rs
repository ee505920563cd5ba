//! Image hand-over: the image lock follows the *running* device, not the
//! process, so that two vmcrypt daemons can hold one image open while QEMU
//! migrates a VM between them, and only the one whose device runs writes.
//!
//! - A frontend starts the device (`SET_FEATURES`, or a memory table): the
//!   lock is taken, exclusive for a writable disk. If the image changed since
//!   this daemon last had it (its size or times differ from when it was
//!   opened or when this daemon's device last stopped), or it is a block
//!   device (whose times tell nothing), its clean pages are dropped from the
//!   page cache, so blocks another host wrote meanwhile are read afresh. An
//!   unchanged file keeps its warm cache across guest reboots and reconnects.
//!   If another daemon's device runs on the image, the start is refused (the
//!   frontend sees the memory table message fail).
//! - The device stops (every queue stopped with `GET_VRING_BASE`, or the
//!   frontend disconnected): requests taken are already complete, the image
//!   is flushed, then the lock is released.
//!
//! The lock is a `flock(2)` on the image: it covers daemons on one host (and
//! file systems that forward flock, such as some cluster file systems). It
//! does not reach across hosts on NFS or other shared storage; there the
//! orchestration (libvirt, the migration itself) must keep two devices from
//! running at once.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::storage::{Image, Stamp, StorageError};
use crate::worker::Capacity;

/// How long a device start waits for a lock held by a daemon that is going
/// away (a killed daemon's io_uring releases the file a little after exit).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The image lock of one daemon, taken and released with its device.
#[derive(Debug)]
pub struct Handover {
    image: Arc<Image>,
    read_only: bool,
    /// The image as this daemon last left it (opened, or flushed at stop);
    /// the lock also serialises starts and stops.
    seen: Mutex<Option<Stamp>>,
    /// Read by the queue threads before they take requests.
    held: AtomicBool,
    /// The disk's capacity and block size, re-read from the image at every
    /// start: another daemon may have grown it (a resize through the
    /// source of a migration).
    capacity: Option<(Capacity, u64)>,
}

impl Handover {
    pub fn new(image: Arc<Image>, read_only: bool) -> Self {
        Handover {
            read_only,
            seen: Mutex::new(image.stamp()),
            held: AtomicBool::new(false),
            image,
            capacity: None,
        }
    }

    /// Keeps `capacity` (of `block_size`-byte blocks) up to date with the
    /// image at every device start.
    pub fn tracking(mut self, capacity: Capacity, block_size: u32) -> Self {
        self.capacity = Some((capacity, u64::from(block_size)));
        self
    }

    /// Re-reads the image's size into the capacity the queues check.
    fn refresh_capacity(&self) {
        let Some((capacity, block)) = &self.capacity else {
            return;
        };
        match self.image.current_capacity() {
            Ok(bytes) => {
                let bytes = bytes - bytes % block;
                let old = capacity.get();
                if bytes != old && bytes > 0 {
                    tracing::info!(
                        capacity = bytes,
                        previous = old,
                        "the image's size changed since this daemon opened it"
                    );
                    capacity.set(bytes);
                }
            }
            Err(e) => tracing::warn!("re-reading the image's size: {e}"),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<Stamp>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A frontend starts the device: take the lock unless already held.
    pub fn device_started(&self) -> Result<(), StorageError> {
        self.start(LOCK_WAIT).inspect_err(|e| {
            tracing::error!("cannot start the device: {e}; its queues wait for the lock");
        })
    }

    /// A queue runs but the device could not take the lock when it
    /// started (a start within one connection, which QEMU does not let
    /// fail): take it now if it is free. The queue retries until it is.
    pub fn try_start(&self) -> bool {
        self.start(Duration::ZERO).is_ok()
    }

    fn start(&self, wait: Duration) -> Result<(), StorageError> {
        let seen = self.seen();
        if self.is_held() {
            return Ok(());
        }
        self.image.lock(self.read_only, wait)?;
        self.refresh_capacity();
        let now = self.image.stamp();
        if now.is_some_and(|s| s.block_device || s.network || Some(s) != *seen) {
            tracing::info!(
                "the image changed since this daemon last had it: dropping its page cache"
            );
            self.image.drop_cache();
        }
        self.held.store(true, Ordering::Release);
        tracing::info!("device started: image lock taken");
        Ok(())
    }

    /// The device stopped and nothing is in flight: flush, then release the
    /// lock. On a failed flush the lock is kept, so no other daemon takes
    /// over an image whose last writes may not be durable.
    pub fn device_stopped(&self) -> io::Result<()> {
        let mut seen = self.seen();
        if !self.is_held() {
            return Ok(());
        }
        self.image.sync()?;
        *seen = self.image.stamp();
        self.held.store(false, Ordering::Release);
        self.image.unlock();
        tracing::info!("device stopped: image flushed, lock released");
        Ok(())
    }

    /// Makes what the device completed durable (one queue stopped, others run on).
    pub fn sync(&self) -> io::Result<()> {
        self.image.sync()
    }

    /// Whether this daemon's device holds the image: queues take requests
    /// only while it does.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of 1 MiB at `path`, made afresh.
    fn image(path: &std::path::Path) -> Arc<Image> {
        std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
        open_image(path)
    }

    /// The image at `path`, opened once more (as by a second daemon).
    fn open_image(path: &std::path::Path) -> Arc<Image> {
        let f = crate::storage::open(path, false).unwrap();
        Arc::new(Image::from_file(f, path, 0, 512, None).unwrap())
    }

    #[test]
    fn only_one_running_device_holds_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let a = Handover::new(image(&path), false);
        let b = Handover::new(open_image(&path), false);
        a.device_started().unwrap();
        a.device_started().unwrap();
        assert!(matches!(
            b.device_started(),
            Err(StorageError::Locked { .. })
        ));
        assert!(!b.is_held());
        a.device_stopped().unwrap();
        assert!(!a.is_held());
        b.device_started().unwrap();
        assert!(b.is_held());
        assert!(matches!(
            a.device_started(),
            Err(StorageError::Locked { .. })
        ));
    }

    /// Pages of `path` in the page cache.
    fn cached_pages(path: &std::path::Path) -> usize {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared mapping of the whole file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: p/len is the mapping; vec has a byte per page.
        assert_eq!(unsafe { libc::mincore(p, len, vec.as_mut_ptr()) }, 0);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn the_page_cache_is_dropped_only_when_someone_else_wrote_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let h = Handover::new(image(&path), false);
        let _ = std::fs::read(&path).unwrap();
        assert_eq!(cached_pages(&path), 256);
        // Unchanged since opened: the cache stays warm.
        h.device_started().unwrap();
        assert_eq!(cached_pages(&path), 256);
        h.device_stopped().unwrap();
        // Another writer (another host, in production) changes the file;
        // here it grows it, which leaves no dirty page behind (the kernel
        // keeps dirty pages, and a large folio with them, in the cache).
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len((1 << 20) + 4096).unwrap();
        let _ = std::fs::read(&path).unwrap();
        h.device_started().unwrap();
        let left = cached_pages(&path);
        assert!(
            left < 256,
            "the page cache was kept: {left} pages, {:?}",
            h.image.stamp()
        );
    }
}
