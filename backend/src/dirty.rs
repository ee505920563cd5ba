//! Dirty logging of guest memory for live migration (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While QEMU migrates a VM it asks the backend to log every guest page the
//! backend writes, in a bitmap QEMU shares (`SET_LOG_BASE`). Writes made
//! through vm-memory (status bytes, used ring entries) are logged by the
//! region's bitmap, [`DirtyLog`]; writes made through raw pointers (storage
//! reading into guest buffers, decryption, GET_ID) are logged by the worker
//! with [`mark`] before the request is returned to the guest.
//!
//! vhost-user-backend's own [`BitmapMmapRegion`] takes a lock and clones an
//! `Arc` on every guest memory access, logging or not. [`DirtyLog`] checks
//! one flag that is only ever written when logging starts, so the I/O path
//! pays nothing while no migration runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMem;

/// Set once any region's writes are logged: until then the workers skip
/// logging their raw-pointer writes altogether.
static LOGGING: AtomicBool = AtomicBool::new(false);

/// Whether a frontend has asked for dirty logging (in this process's life).
pub fn logging() -> bool {
    LOGGING.load(Ordering::Relaxed)
}

/// The dirty-page bitmap of one guest memory region.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Set once the frontend has handed over a log: until then nothing is logged.
    active: AtomicBool,
    log: BitmapMmapRegion,
}

impl DirtyLog {
    /// Whether this region's writes are being logged.
    pub fn is_active(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, DirtyLog>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.is_active() {
            self.0.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_active() && self.0.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyLog> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.0.log.replace(bitmap);
        self.0.active.store(true, Ordering::Release);
        LOGGING.store(true, Ordering::Release);
        tracing::info!("dirty logging of guest memory started (migration)");
    }
}

/// Logs `len` bytes of guest memory from `addr` as written by the device.
/// Costs a flag check per region while no log is set.
pub fn mark(mem: &GuestMem, addr: GuestAddress, len: usize) {
    let mut done = 0usize;
    while done < len {
        let a = GuestAddress(addr.0.wrapping_add(done as u64));
        let Some(region) = mem.find_region(a) else {
            return;
        };
        let Some(offset) = mem.to_region_addr(a).map(|(_, off)| off.0 as usize) else {
            return;
        };
        let in_region = (region.len() as usize).saturating_sub(offset);
        let n = in_region.min(len - done);
        if n == 0 {
            return;
        }
        region.bitmap().mark_dirty(offset, n);
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    // Logging itself needs a log from a frontend (`SET_LOG_BASE`); the
    // migration guest test covers it. Here: nothing is logged, and nothing
    // breaks, while no log is set.
    #[test]
    fn without_a_log_nothing_is_marked() {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)])
                .unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        mark(&mem, GuestAddress((1 << 20) - 8), 0x20);
        mark(&mem, GuestAddress(u64::MAX - 4), 64);
        assert!(!logging());
        for a in [0x3000u64, (1 << 20) - 8, 1 << 20] {
            let r = mem.find_region(GuestAddress(a)).unwrap();
            assert!(!r.bitmap().dirty_at(0));
        }
    }
}
