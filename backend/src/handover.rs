//! Image hand-over: the image lock follows the *running* device, not the
//! process, so that two vmcrypt daemons can hold one image open while QEMU
//! migrates a VM between them, and only the one whose device runs writes.
//!
//! - A frontend starts the device (its first memory table): the lock is
//!   taken, exclusive for a writable disk, and the image's clean pages are
//!   dropped from the page cache so blocks another host wrote meanwhile are
//!   read afresh. If another daemon's device runs on the image, the start is
//!   refused (the frontend sees the memory table message fail).
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

use crate::storage::{Image, StorageError};

/// How long a device start waits for a lock held by a daemon that is going
/// away (a killed daemon's io_uring releases the file a little after exit).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The image lock of one daemon, taken and released with its device.
#[derive(Debug)]
pub struct Handover {
    image: Arc<Image>,
    read_only: bool,
    /// Serialises starts and stops.
    transition: Mutex<()>,
    /// Read by the queue threads before they take requests.
    held: AtomicBool,
}

impl Handover {
    pub fn new(image: Arc<Image>, read_only: bool) -> Self {
        Handover {
            image,
            read_only,
            transition: Mutex::new(()),
            held: AtomicBool::new(false),
        }
    }

    fn transition(&self) -> std::sync::MutexGuard<'_, ()> {
        self.transition.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A frontend starts the device: take the lock unless already held.
    pub fn device_started(&self) -> Result<(), StorageError> {
        let _t = self.transition();
        if self.is_held() {
            return Ok(());
        }
        if let Err(e) = self.image.lock(self.read_only, LOCK_WAIT) {
            tracing::error!("refusing to start the device: {e}");
            return Err(e);
        }
        self.image.drop_cache();
        self.held.store(true, Ordering::Release);
        tracing::info!("device started: image lock taken");
        Ok(())
    }

    /// The device stopped and nothing is in flight: flush, then release the
    /// lock. On a failed flush the lock is kept, so no other daemon takes
    /// over an image whose last writes may not be durable.
    pub fn device_stopped(&self) -> io::Result<()> {
        let _t = self.transition();
        if !self.is_held() {
            return Ok(());
        }
        self.image.sync()?;
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

    fn image(path: &std::path::Path) -> Arc<Image> {
        std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
        let f = crate::storage::open(path, false).unwrap();
        Arc::new(Image::from_file(f, path, 0, 512).unwrap())
    }

    #[test]
    fn only_one_running_device_holds_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let a = Handover::new(image(&path), false);
        let b = Handover::new(
            Arc::new(
                Image::from_file(crate::storage::open(&path, false).unwrap(), &path, 0, 512)
                    .unwrap(),
            ),
            false,
        );
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
}
