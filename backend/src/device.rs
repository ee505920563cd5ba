//! The vhost-user-blk device: what is negotiated with the frontend (virtio
//! and protocol features, the config space), and the dispatch of each
//! queue thread's events to that queue's worker.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dirty::DirtyLog;
use crate::filter::{Filter, Pipeline};
use crate::handover::Handover;
use crate::inflight::InflightRegion;
use crate::request::SECTOR_SHIFT;
use crate::storage::{Image, QueueStorage, StorageError};
use crate::worker::{DiskInfo, QueueWorker, Vring};
use crate::GuestMemAtomic;

/// Size of the config space we fill (up to and including write_zeroes_may_unmap).
const CONFIG_LEN: usize = 60;
/// Longest wait for the frontend on the backend request channel.
const BACKEND_REQ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Offset of `writeback` in the config space.
const WRITEBACK: usize = 32;

/// Settings of the device that do not change while serving.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    pub num_queues: usize,
    pub queue_size: u16,
    pub disk: Arc<DiskInfo>,
    /// Longest busy-polling window of a queue thread (zero: never poll).
    pub poll_max: std::time::Duration,
}

/// The device for one frontend connection; clones share it.
#[derive(Clone)]
pub struct BlockDevice(Arc<Inner>);

struct Inner {
    settings: DeviceSettings,
    config: [u8; CONFIG_LEN],
    /// One worker per queue, each locked only by its queue's thread (and by
    /// the control thread while stopping that queue).
    workers: Vec<Mutex<QueueWorker>>,
    /// Per queue: the frontend has started it (a kick arrived) and not
    /// stopped it since.
    running: Vec<Arc<AtomicBool>>,
    handover: Arc<Handover>,
    /// The backend request channel, if the frontend set one up: how the
    /// frontend learns that the config space changed (a resize).
    backend_req: Mutex<Option<Backend>>,
    /// The frontend handed over a dirty log and wants it kept (a migration
    /// runs), for `status` and the log.
    dirty_logging: AtomicBool,
}

/// The device's queues held still (see [`BlockDevice::pause`]): no queue
/// takes a request, and nothing taken is in flight, until this is dropped.
pub struct Paused<'a> {
    workers: Vec<MutexGuard<'a, QueueWorker>>,
}

impl Paused<'_> {
    /// The disk grew: the queues check requests against `bytes` once they
    /// resume.
    pub fn set_capacity(&mut self, bytes: u64) {
        for w in &mut self.workers {
            w.set_capacity(bytes);
        }
    }
}

impl BlockDevice {
    /// A device with fresh queues over `image`.
    pub fn new(
        settings: DeviceSettings,
        image: &Arc<Image>,
        filters: &[Arc<dyn Filter>],
        mem: GuestMemAtomic,
        handover: Arc<Handover>,
    ) -> Result<Self, StorageError> {
        let mut workers = Vec::with_capacity(settings.num_queues);
        // Each connection starts with the write cache on (writeback).
        settings.disk.write_cache.set(true);
        let mut running = Vec::with_capacity(settings.num_queues);
        for q in 0..settings.num_queues {
            let storage = QueueStorage::new(
                image,
                q,
                u32::from(settings.queue_size),
                settings.disk.metrics.queues[q].clone(),
            )?;
            let worker = QueueWorker::new(
                q,
                settings.disk.clone(),
                mem.clone(),
                Pipeline::new(filters, q),
                storage,
                settings.poll_max,
                handover.clone(),
            )
            .map_err(StorageError::Uring)?;
            running.push(worker.running_flag());
            workers.push(Mutex::new(worker));
        }
        Ok(BlockDevice(Arc::new(Inner {
            config: config_space(&settings),
            running,
            settings,
            workers,
            handover,
            backend_req: Mutex::new(None),
            dirty_logging: AtomicBool::new(false),
        })))
    }

    /// Holds every queue still: each queue's worker is taken from its
    /// thread (which waits for it on its next event, so kicks wait too),
    /// and everything already taken from the rings is completed. The image
    /// then changes only through the caller until the result is dropped.
    pub fn pause(&self) -> io::Result<Paused<'_>> {
        let mut workers: Vec<_> = (0..self.0.workers.len()).map(|q| self.worker(q)).collect();
        for w in &mut workers {
            w.drain()?;
        }
        Ok(Paused { workers })
    }

    /// Whether a frontend runs the device: it holds the image (see
    /// `handover`).
    pub fn is_running(&self) -> bool {
        self.0.handover.is_held()
    }

    /// Whether the queues log their writes to guest memory for a migration.
    pub fn dirty_logging(&self) -> bool {
        self.0.dirty_logging.load(Ordering::Acquire)
    }

    /// Interrupts the guest on every running queue; how many were.
    pub fn signal_guest(&self) -> io::Result<usize> {
        let mut n = 0;
        for q in 0..self.0.workers.len() {
            n += usize::from(self.worker(q).signal_guest()?);
        }
        Ok(n)
    }

    /// Tells the frontend that the config space changed (the capacity), so
    /// that it reads it again and tells the guest. False when the frontend
    /// has no backend request channel (it learns on its next connection).
    pub fn config_changed(&self) -> io::Result<bool> {
        let channel = self
            .0
            .backend_req
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match channel {
            Some(b) => b.handle_config_change().map(|_| true),
            None => Ok(false),
        }
    }

    fn worker(&self, q: usize) -> MutexGuard<'_, QueueWorker> {
        self.0.workers[q].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Event ids a queue thread uses beyond its vring's kick (which is 0).
    fn storage_event(&self) -> u16 {
        self.0.settings.num_queues as u16 + 1
    }

    fn timer_event(&self) -> u16 {
        self.0.settings.num_queues as u16 + 2
    }

    /// Registers each worker's storage and timer fds with its queue thread.
    pub fn register_fds(&self, handlers: &[Arc<VringEpollHandler<BlockDevice>>]) -> io::Result<()> {
        for (q, h) in handlers.iter().enumerate() {
            let w = self.worker(q);
            if let Some(fd) = w.storage_fd() {
                h.register_listener(fd, EventSet::IN, u64::from(self.storage_event()))?;
            }
            h.register_listener(w.timer_fd(), EventSet::IN, u64::from(self.timer_event()))?;
        }
        Ok(())
    }

    /// Stops every queue for good (frontend gone, or shutting down): nothing
    /// more is taken from the rings, and what was taken is completed, so no
    /// storage operation still points into guest memory afterwards.
    pub fn stop(&self) {
        for q in 0..self.0.workers.len() {
            if let Err(e) = self.worker(q).stop() {
                tracing::error!(queue = q, "stopping queue: {e}");
            }
            self.0.running[q].store(false, Ordering::Release);
        }
    }

    /// Stops every queue and releases the image: the device is gone.
    pub fn shut(&self) {
        self.stop();
        if let Err(e) = self.0.handover.device_stopped() {
            tracing::error!(
                "flushing the image after the device stopped: {e}; keeping the image lock"
            );
        }
    }
}

/// The virtio-blk config space (virtio 1.2, 5.2.4), little endian.
fn config_space(s: &DeviceSettings) -> [u8; CONFIG_LEN] {
    let l = &s.disk.limits;
    let mut c = [0u8; CONFIG_LEN];
    let put = |c: &mut [u8; CONFIG_LEN], off: usize, bytes: &[u8]| {
        c[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut c, 0, &(l.capacity >> SECTOR_SHIFT).to_le_bytes());
    put(&mut c, 8, &l.size_max.to_le_bytes());
    put(&mut c, 12, &l.seg_max.to_le_bytes());
    // geometry (16..20) left zero
    put(&mut c, 20, &l.block_size.to_le_bytes());
    // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    c[24] = 0;
    c[25] = 0;
    put(&mut c, 26, &1u16.to_le_bytes());
    put(&mut c, 28, &0u32.to_le_bytes());
    // writeback (32) is filled in by get_config
    put(&mut c, 34, &(s.num_queues as u16).to_le_bytes());
    let block_sectors = l.block_size >> SECTOR_SHIFT;
    put(
        &mut c,
        36,
        &((l.max_discard >> SECTOR_SHIFT) as u32).to_le_bytes(),
    );
    put(&mut c, 40, &1u32.to_le_bytes());
    put(&mut c, 44, &block_sectors.to_le_bytes());
    put(
        &mut c,
        48,
        &((l.max_write_zeroes >> SECTOR_SHIFT) as u32).to_le_bytes(),
    );
    put(&mut c, 52, &1u32.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.settings.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.settings.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.0.settings.disk.limits.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    /// `SET_BACKEND_REQ_FD`: kept for telling the frontend about a resize.
    /// A frontend that never answers a request on it (its REPLY_ACK) must
    /// not hold the control thread that sent it: replies get a deadline.
    fn set_backend_req_fd(&self, backend: Backend) {
        backend.set_reply_timeout(Some(BACKEND_REQ_TIMEOUT));
        *self.0.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    /// The crate sets EVENT_IDX on each vring's queue, whose notification
    /// calls then follow it; the workers need not know.
    fn set_event_idx(&self, _enabled: bool) {}

    /// `SET_FEATURES`: QEMU sends it every time it starts the device, also
    /// when the memory table is unchanged and so not sent again (a guest
    /// driver reset, a VM resumed after a failed migration): take the image.
    /// This message cannot be refused; a refusal shows at the memory table,
    /// and the queues take no request without the lock.
    ///
    /// Without `VHOST_F_LOG_ALL` the frontend no longer wants dirty logging
    /// (the migration ended or failed): the workers drop the log.
    fn acked_features(&self, features: u64) {
        let _ = self.0.handover.device_started();
        if features & VhostUserVirtioFeatures::LOG_ALL.bits() == 0 {
            for q in 0..self.0.workers.len() {
                self.worker(q).set_dirty_log(None);
            }
            if self.0.dirty_logging.swap(false, Ordering::AcqRel) {
                tracing::info!("dirty logging of guest memory stopped (the migration ended)");
            }
        }
    }

    /// `SET_LOG_BASE`: vmcrypt logs its writes to guest memory itself, so
    /// guest memory carries no bitmap (see `dirty`).
    fn set_log_base(&self, log: &VhostUserLog, file: &File) -> io::Result<bool> {
        let log = Arc::new(DirtyLog::map(log, file)?);
        for q in 0..self.0.workers.len() {
            self.worker(q).set_dirty_log(Some(log.clone()));
        }
        self.0.dirty_logging.store(true, Ordering::Release);
        tracing::info!("dirty logging of guest memory started (migration)");
        Ok(true)
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut c = self.0.config;
        c[..8]
            .copy_from_slice(&(self.0.settings.disk.capacity.get() >> SECTOR_SHIFT).to_le_bytes());
        c[WRITEBACK] = u8::from(self.0.settings.disk.write_cache.is_on());
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    /// `SET_CONFIG`: of the config space only `writeback` is writable (QEMU
    /// forwards a guest's change of it, one byte); writes to other fields
    /// are ignored, as QEMU's own virtio-blk does. 0 is write-through.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let Some(on) = WRITEBACK
            .checked_sub(start)
            .and_then(|i| buf.get(i))
            .map(|b| *b != 0)
        else {
            tracing::debug!(
                offset,
                len = buf.len(),
                "ignored a write to read-only config space"
            );
            return Ok(());
        };
        if self.0.settings.disk.write_cache.set(on) {
            tracing::info!(
                "guest set the write cache {}",
                if on {
                    "on (writeback)"
                } else {
                    "off (write-through: every write is durable on completion)"
                }
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        // The workers hold the same GuestMemoryAtomic and load the new table
        // on their next event; in-flight requests keep the old one mapped.
        // A table with memory in it starts the device: take the image, or
        // refuse the table if another daemon's device runs on it.
        if mem.memory().num_regions() > 0 {
            self.0.handover.device_started().map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (_, file, info) = InflightRegion::allocate(msg.num_queues, msg.queue_size)?;
        tracing::debug!(
            queues = info.num_queues,
            queue_size = info.queue_size,
            bytes = info.mmap_size,
            "in-flight region allocated"
        );
        Ok((info, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::open(msg, &file)?;
        for q in 0..self.0.workers.len() {
            self.worker(q).set_inflight(region.queue(q));
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.settings.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// `GET_VRING_BASE`: the frontend takes the ring back. Everything taken
    /// from it is completed and made durable; once no queue runs, the image
    /// is released (the destination of a migration may take it over).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        if q >= self.0.workers.len() {
            return Ok(());
        }
        {
            let mut w = self.worker(q);
            w.drain()?;
            w.restart_pending();
            // Under the worker lock: a kick handled after this sees the
            // ring not ready (the crate marks it so before this call) and
            // cannot mark the queue running again.
            self.0.running[q].store(false, Ordering::Release);
        }
        if self.0.running.iter().any(|r| r.load(Ordering::Acquire)) {
            self.0.handover.sync()
        } else {
            self.0.handover.device_stopped()
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let mut w = self.worker(thread_id);
        w.set_vring(vring);
        let r = match device_event {
            0 => {
                let running = &self.0.running[thread_id];
                if !running.load(Ordering::Relaxed)
                    && virtio_queue::QueueT::ready(vring.get_ref().get_queue())
                {
                    running.store(true, Ordering::Release);
                }
                w.on_kick(vring)
            }
            e if e == self.storage_event() => w.on_storage(vring),
            e if e == self.timer_event() => w.on_timer(vring),
            e => {
                tracing::warn!(thread_id, event = e, "unexpected event");
                Ok(())
            }
        };
        // An error here (a ring address the memory table does not cover, a
        // failed io_uring call) would end the queue's thread for good: log
        // it and keep serving; the next event tries again.
        if let Err(e) = r {
            warn_limited!(queue = thread_id, "serving the queue: {e}");
        }
        Ok(())
    }
}
