//! One virtqueue's worker: takes requests from the ring, sends them down the
//! filter pipeline to storage, and completes them back to the guest.
//!
//! A worker is used by its queue's thread only (and by the control thread
//! while it drains the queue on stop or shutdown), so nothing here is shared
//! across queues. A slot's iovec arrays and bounce buffer live on the heap
//! and are not touched while the request is in flight, so the addresses
//! handed to io_uring stay valid until its completion.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::dirty::DirtyLog;
use crate::filter::{Outcome, Pipeline};
use crate::handover::Handover;
use crate::inflight::QueueInflight;
use crate::metrics::QueueMetrics;
use crate::request::chain::Chain;
use crate::request::{self, Iov, Limits, Op, ParseError, Request, Status, ID_BYTES};
use crate::storage::{IoOp, QueueStorage, Submitted};
use crate::sys::Timer;
use crate::{GuestMem, GuestMemAtomic};

pub type Vring = VringMutex<GuestMemAtomic>;

/// How long after `SET_INFLIGHT_FD` a queue looks for its ring to start, to
/// resubmit requests without a kick.
const RECOVERY_WAIT: Duration = Duration::from_secs(5);

/// How often a queue that runs without the image lock tries to take it.
const LOCK_RETRY: Duration = Duration::from_millis(100);

/// Longest a queue thread serves its ring at a stretch, holding the vring
/// and worker locks. A guest that republishes a request as soon as one
/// completes would otherwise hold them for ever: the frontend's messages
/// that need them (SET_VRING_ENABLE, SET_LOG_BASE, ...; QEMU waits for some
/// holding its big lock) and the control socket's pause would wait.
const SERVICE_SLICE: Duration = Duration::from_millis(2);

/// How soon a queue that gave the locks up comes back to its ring.
const SERVICE_RESUME: Duration = Duration::from_micros(50);

/// With direct I/O, a queue thread spins for completions (within its
/// polling window) while at most this many requests are at the device: at
/// queue depth 1 on this machine's virtio disk it cut the p50 latency of
/// 4 KiB reads from 71 to 56 µs, while deeper queues gained nothing and
/// lost throughput to the spinning.
const POLL_IN_FLIGHT_MAX: usize = 4;

/// Completions between notifications of the guest within one batch.
const NOTIFY_EVERY: usize = 8;
/// Requests completed while new ones are taken (reads decrypted straight
/// from the page cache) are signalled once they moved this many bytes
/// (about 20 µs of decryption), so that the guest refills the ring while
/// the rest are served...
const NOTIFY_BYTES: u64 = 256 << 10;
/// ...but large ones (this size or more, on average), each of which keeps
/// the queue busy long enough, only once the ring is about to run dry: at
/// most this many requests left to take. The guest still refills it in
/// time, and is woken a third as often at queue depth 8 (every 6
/// completions instead of every 2)...
const NOTIFY_LARGE: u64 = 64 << 10;
const NOTIFY_LOW_WATER: u16 = 2;
/// ...or, in a long batch, once they moved this many (about 70 µs of
/// decryption), to bound their latency.
const NOTIFY_MAX_BYTES: u64 = 1 << 20;

/// Whether a queue thread may spin with `in_flight` requests at storage;
/// `at_device`: they wait at the device (direct I/O), not in kernel or
/// librbd threads that need a CPU.
fn spins_with(in_flight: usize, at_device: bool) -> bool {
    in_flight == 0 || (at_device && in_flight <= POLL_IN_FLIGHT_MAX)
}

/// Whether requests completed while the batch goes on (`requests` of them,
/// which moved `bytes`) are signalled before the next request is taken;
/// `left` counts the requests the ring still holds.
fn notify_now(bytes: u64, requests: u64, left: impl FnOnce() -> u16) -> bool {
    if bytes >= NOTIFY_MAX_BYTES {
        return true;
    }
    if bytes < NOTIFY_BYTES {
        return false;
    }
    bytes < requests.saturating_mul(NOTIFY_LARGE) || left() <= NOTIFY_LOW_WATER
}

/// Requests the guest has made available that the queue has not taken yet
/// (0 if the ring cannot be read: the batch then ends soon anyway).
fn avail_left(queue: &Queue, mem: &GuestMem) -> u16 {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0.wrapping_sub(queue.next_avail()),
        Err(_) => 0,
    }
}

/// A request and what the worker tracks about it while it is in flight.
#[derive(Default)]
struct Slot {
    req: Request,
    /// Keeps the guest memory this request points into mapped until it completes.
    mem: Option<Arc<GuestMem>>,
    /// The pipeline stage the request stands at (`pipeline.len()` once at storage).
    stage: usize,
    /// When a delayed request may be retried.
    until: Option<Instant>,
    /// Bytes storage has transferred so far.
    done: u64,
    /// The iovecs for the rest of a transfer after a short one, or the bounce buffer's.
    tail: Vec<Iov>,
    /// A write-zeroes whose first fallocate mode was not supported, retried
    /// with the other (zero-range for a hole punch, or the reverse).
    punch_fallback: bool,
    /// The write is done and an fdatasync runs before it completes (the
    /// guest chose write-through).
    syncing: bool,
}

/// What a worker knows about the disk.
#[derive(Clone, Debug)]
pub struct DiskInfo {
    /// The limits a connection starts with; `limits.capacity` is where the
    /// disk started, `capacity` what it is now.
    pub limits: Limits,
    /// The capacity now: a live resize grows it.
    pub capacity: Capacity,
    /// Bytes of the image before the disk's first sector.
    pub data_offset: u64,
    pub serial: [u8; ID_BYTES],
    /// The guest's cache mode, which it may change while running.
    pub write_cache: WriteCache,
    /// Counters and latencies per queue, kept across connections.
    pub metrics: Arc<crate::metrics::DiskMetrics>,
}

/// The disk's capacity in bytes, shared by the device (its config space),
/// the control socket (resize), the device start (which re-reads the
/// image's size) and each new connection's workers. The workers keep a
/// copy, refreshed once per wake-up and while their queues are paused, so
/// no request reads the shared value.
#[derive(Clone, Debug)]
pub struct Capacity(Arc<std::sync::atomic::AtomicU64>);

impl Capacity {
    pub fn new(bytes: u64) -> Self {
        Capacity(Arc::new(std::sync::atomic::AtomicU64::new(bytes)))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Release)
    }
}

/// `writeback` in the config space (VIRTIO_BLK_F_CONFIG_WCE). Off
/// (write-through), a write completes only once it is durable.
#[derive(Clone, Debug)]
pub struct WriteCache(Arc<AtomicBool>);

impl Default for WriteCache {
    fn default() -> Self {
        WriteCache(Arc::new(AtomicBool::new(true)))
    }
}

impl WriteCache {
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the mode; true if it changed.
    pub fn set(&self, on: bool) -> bool {
        self.0.swap(on, Ordering::Relaxed) != on
    }
}

pub struct QueueWorker {
    index: usize,
    disk: Arc<DiskInfo>,
    /// The disk's limits, with the capacity as this queue last saw it.
    limits: Limits,
    /// This queue's counters (this thread is their only writer).
    metrics: Arc<QueueMetrics>,
    mem: GuestMemAtomic,
    pipeline: Pipeline,
    storage: QueueStorage,
    timer: Timer,
    slots: Vec<Slot>,
    free: Vec<usize>,
    deferred: VecDeque<usize>,
    /// The vring this worker serves, known from its first event.
    vring: Option<Vring>,
    /// Set on shutdown: the ring is no longer read.
    stopped: bool,
    /// Scratch for reaped completions.
    reaped: Vec<(usize, i64)>,
    /// Requests were returned to the ring since the guest was last notified.
    returned: bool,
    /// How many of those requests, and the bytes they moved.
    unsignalled: u64,
    unsignalled_bytes: u64,
    /// Current and largest busy-polling window, in nanoseconds.
    poll_ns: u64,
    poll_max_ns: u64,
    /// When the thread last went back to waiting for events.
    idle_since: Option<Instant>,
    /// Requests are taken only while this daemon's device holds the image.
    handover: Arc<Handover>,
    /// The timer is to serve the ring again: the image lock was refused
    /// (it tries again), or the last stretch of work ran out of time.
    resume: bool,
    /// Set whenever this queue takes requests with the image lock held
    /// (by a kick, the timer, or a recovery): the device keeps the lock
    /// while any queue runs (see `device::stop_vring`).
    running: Arc<AtomicBool>,
    /// The queue's part of the frontend's in-flight region, if it set one up.
    inflight: Option<QueueInflight>,
    /// The in-flight region must be read before the next request is taken
    /// (a region was handed over, or the ring was stopped).
    recover_pending: bool,
    /// Until when the timer looks for the ring to start after a region arrived.
    recover_until: Option<Instant>,
    /// Heads taken before a restart, to run again before new requests.
    resubmit: VecDeque<u16>,
    /// Order of the next head taken, recorded in the in-flight region.
    counter: u64,
    /// The frontend's dirty log while it migrates the VM.
    dirty_log: Option<Arc<DirtyLog>>,
    /// By head index: taken from the ring and not yet returned. A head the
    /// guest publishes again while in flight is not taken twice, and a head
    /// is never returned twice.
    taken: Vec<bool>,
    /// Requests returned in this batch, counted with one clock reading for
    /// the whole batch (`count_returned`): a reading per request would cost
    /// more than the rest of the counting.
    returned_now: Vec<Returned>,
}

/// A returned request, for the counters.
struct Returned {
    op: Op,
    bytes: u64,
    status: Status,
    started: Instant,
}

impl QueueWorker {
    pub fn new(
        index: usize,
        disk: Arc<DiskInfo>,
        mem: GuestMemAtomic,
        pipeline: Pipeline,
        storage: QueueStorage,
        poll_max: Duration,
        handover: Arc<Handover>,
    ) -> io::Result<Self> {
        let mut limits = disk.limits.clone();
        limits.capacity = disk.capacity.get();
        Ok(QueueWorker {
            index,
            limits,
            metrics: disk.metrics.queues[index].clone(),
            disk,
            mem,
            pipeline,
            storage,
            timer: Timer::new()?,
            slots: Vec::new(),
            free: Vec::new(),
            deferred: VecDeque::new(),
            vring: None,
            stopped: false,
            reaped: Vec::new(),
            returned: false,
            unsignalled_bytes: 0,
            unsignalled: 0,
            poll_ns: 0,
            poll_max_ns: poll_max.as_nanos() as u64,
            idle_since: None,
            handover,
            resume: false,
            running: Arc::default(),
            inflight: None,
            recover_pending: false,
            recover_until: None,
            resubmit: VecDeque::new(),
            counter: 1,
            taken: Vec::new(),
            dirty_log: None,
            returned_now: Vec::new(),
        })
    }

    /// Whether this queue runs: set when it takes requests with the image
    /// lock held, cleared by the device when the frontend stops the ring.
    pub fn running_flag(&self) -> Arc<AtomicBool> {
        self.running.clone()
    }

    /// Starts (`Some`) or stops logging the guest memory this queue writes.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.dirty_log = log;
    }

    /// Logs the queue's used ring as written (used elements, the used index,
    /// the available-event index).
    fn log_used_ring(&self, queue: &Queue) {
        if let Some(log) = &self.dirty_log {
            let len = 6 + 8 * usize::from(queue.size());
            log.mark(GuestAddress(queue.used_ring()), len);
        }
    }

    /// The frontend handed over an in-flight region (`SET_INFLIGHT_FD`).
    pub fn set_inflight(&mut self, inflight: Option<QueueInflight>) {
        self.inflight = inflight;
        self.recover_pending = true;
        let now = Instant::now();
        self.recover_until = Some(now + RECOVERY_WAIT);
        if let Err(e) = self.timer.arm(now + Duration::from_millis(10)) {
            tracing::error!(queue = self.index, "cannot arm timer: {e}");
        }
    }

    /// The ring was stopped (`GET_VRING_BASE`): when it starts again, read
    /// the region afresh.
    pub fn restart_pending(&mut self) {
        self.recover_pending = true;
        if let Some(vring) = &self.vring {
            let state = vring.get_ref();
            let q = state.get_queue();
            tracing::info!(
                queue = self.index,
                next_avail = q.next_avail(),
                next_used = q.next_used(),
                "ring stopped; every request taken is complete"
            );
        }
    }

    /// The fds the queue thread must also wait on: storage completions and the timer.
    pub fn storage_fd(&self) -> Option<i32> {
        self.storage.completion_fd().map(|e| e.as_raw_fd())
    }

    pub fn timer_fd(&self) -> i32 {
        self.timer.as_raw_fd()
    }

    pub fn set_vring(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
    }

    /// Interrupts the guest for this queue if its ring runs: the driver
    /// then looks at the used ring (a spurious interrupt costs it only that
    /// look). True if signalled.
    pub fn signal_guest(&mut self) -> io::Result<bool> {
        let Some(vring) = &self.vring else {
            return Ok(false);
        };
        let state = vring.get_mut();
        if self.stopped || !state.get_queue().ready() || !state.is_enabled() {
            return Ok(false);
        }
        state.signal_used_queue()?;
        Ok(true)
    }

    /// The guest kicked the queue: take every available request.
    pub fn on_kick(&mut self, vring: &Vring) -> io::Result<()> {
        let r = self.service(vring);
        self.count_returned();
        r
    }

    /// Storage posted completions.
    pub fn on_storage(&mut self, vring: &Vring) -> io::Result<()> {
        if let Some(efd) = self.storage.completion_fd() {
            // Non-blocking: nothing to read is fine, completions are reaped below.
            let _ = efd.read();
        }
        let r = self.service(vring);
        self.count_returned();
        r
    }

    /// Takes requests from the ring and completions from storage until both
    /// stay quiet for the polling window, then re-enables guest notifications.
    ///
    /// While polling, the guest is told not to kick (notifications stay
    /// disabled), which saves a system call on both sides per batch; the
    /// window adapts as QEMU's does: it grows when the thread was woken soon
    /// after going idle (polling would have caught the event) and shrinks
    /// when it slept longer than the maximum window.
    fn service(&mut self, vring: &Vring) -> io::Result<()> {
        let now = Instant::now();
        self.adapt_poll(now);
        // A device start re-reads the image's size (another daemon may have
        // grown it): one load per wake-up, not per request.
        self.limits.capacity = self.disk.capacity.get();
        let mut state = vring.get_mut();
        loop {
            // The memory table may have changed while we polled (the frontend
            // adds a region, then submits requests that point into it): take
            // the current one for every batch.
            let mem = self.mem.memory().into_inner();
            let enabled = state.is_enabled();
            let queue = state.get_queue_mut();
            let runs = !self.stopped && queue.ready() && enabled;
            if runs && !self.handover.is_held() && !self.handover.try_start() {
                // The device started while another daemon's device held the
                // image (QEMU cannot be told within one connection): the
                // requests wait, and the queue retries, until it is free.
                warn_limited!(
                    queue = self.index,
                    "the image lock is held by another daemon's device: requests wait until it \
                     is released"
                );
                self.resume = true;
                self.timer.arm(Instant::now() + LOCK_RETRY)?;
            }
            if !runs || !self.handover.is_held() {
                // Stopped, not started, disabled (SET_VRING_ENABLE 0: a
                // storage completion must not take new requests either), or
                // the image is another daemon's:
                // finish what storage returns, but neither take requests
                // nor touch the ring's notification fields (after
                // GET_VRING_BASE the ring is the frontend's again).
                self.kick_storage(&mut state, &mem)?;
                self.notify(&mut state)?;
                break;
            }
            if !self.running.load(Ordering::Relaxed) {
                self.running.store(true, Ordering::Release);
            }
            queue
                .disable_notification(&*mem)
                .map_err(io::Error::other)?;
            if self.recover_pending {
                self.recover(queue, &mem);
                // The ring (re)starts: interrupt the guest once, as
                // libvhost-user does on SET_VRING_CALL. Completions the
                // previous backend (a crashed vmcrypt, or the source of a
                // migration) signalled may not have reached this guest; a
                // spurious interrupt costs the driver one look at the ring.
                if let Err(e) = state.signal_used_queue() {
                    tracing::warn!(queue = self.index, "signalling the guest: {e}");
                }
                let q = state.get_queue();
                tracing::info!(
                    queue = self.index,
                    next_avail = q.next_avail(),
                    next_used = q.next_used(),
                    "ring started"
                );
            }
            self.take_requests(&mut state, &mem)?;
            self.kick_storage(&mut state, &mem)?;
            self.notify(&mut state)?;
            if self.poll_for_work(&mut state, &mem)? {
                if now.elapsed() >= SERVICE_SLICE {
                    // More work, but the locks go to whoever waits for
                    // them; notifications stay off, the timer brings the
                    // thread back.
                    self.resume_soon()?;
                    break;
                }
                continue;
            }
            let queue = state.get_queue_mut();
            // Requests published while notifications were off came without
            // a kick, with EVENT_IDX or without (the NO_NOTIFY flag): take
            // them now, or they wait for a kick that never comes.
            let more = queue.enable_notification(&*mem).map_err(io::Error::other)?;
            self.log_used_ring(queue);
            if !more || self.stopped {
                break;
            }
            if now.elapsed() >= SERVICE_SLICE {
                self.resume_soon()?;
                break;
            }
        }
        self.idle_since = Some(Instant::now());
        Ok(())
    }

    /// Comes back to the ring in a moment, after letting others take the
    /// locks (see [`SERVICE_SLICE`]).
    fn resume_soon(&mut self) -> io::Result<()> {
        self.resume = true;
        self.timer.arm(Instant::now() + SERVICE_RESUME)
    }

    /// Reads the in-flight region as the ring starts: heads a previous run
    /// took and did not return are queued for resubmission, and the ring
    /// continues after them.
    fn recover(&mut self, queue: &mut Queue, mem: &GuestMem) {
        self.recover_pending = false;
        // Requests of this run still in flight (a region handed over while
        // the ring runs, which the spec allows): they are kept, completed
        // and returned as usual, never forgotten or taken again.
        let live: Vec<u16> = (0..self.taken.len())
            .filter(|&h| self.taken[h])
            .map(|h| h as u16)
            .collect();
        if live.is_empty() {
            self.taken.clear();
            self.resubmit.clear();
        }
        let Some(inflight) = &self.inflight else {
            return;
        };
        if queue.size() > inflight.desc_num() {
            tracing::warn!(
                queue = self.index,
                "queue of {} entries, in-flight region for {}: requests are not tracked",
                queue.size(),
                inflight.desc_num()
            );
            self.inflight = None;
            return;
        }
        let ring_used = match queue.used_idx(mem, Ordering::Acquire) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(queue = self.index, "reading the used index: {e}");
                return;
            }
        };
        if !live.is_empty() {
            self.counter = inflight.adopt(ring_used.0, &live);
            tracing::info!(
                queue = self.index,
                requests = live.len(),
                "in-flight region handed over while requests run: they are recorded in it"
            );
            return;
        }
        let rec = match inflight.recover(ring_used.0) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::warn!(queue = self.index, "{e}; requests are not tracked");
                self.inflight = None;
                return;
            }
        };
        self.counter = rec.next_counter;
        if rec.fresh {
            return;
        }
        for &head in &rec.resubmit {
            self.set_taken(head, true);
        }
        self.resubmit.extend(rec.resubmit);
        let n = self.resubmit.len() as u16;
        // Where the frontend says the ring stands (SET_VRING_BASE): after a
        // stop, what GET_VRING_BASE returned, which counts the entries
        // consumed without a used element (a head published again while in
        // flight); after a crash, the used index. Never go back before it,
        // or such an entry is taken, and its head returned, a second time.
        let base = queue.next_avail();
        let ahead = base.wrapping_sub(ring_used.0);
        let next = if ahead > n && ahead <= queue.size() {
            base
        } else {
            ring_used.0.wrapping_add(n)
        };
        queue.set_next_avail(next);
        queue.set_next_used(ring_used.0);
        tracing::info!(
            queue = self.index,
            requests = n,
            "in-flight region read: resubmitting {n} requests taken before the restart"
        );
    }

    fn is_taken(&self, head: u16) -> bool {
        self.taken.get(usize::from(head)).copied().unwrap_or(false)
    }

    fn set_taken(&mut self, head: u16, taken: bool) {
        let i = usize::from(head);
        if i >= self.taken.len() {
            self.taken.resize(i + 1, false);
        }
        self.taken[i] = taken;
    }

    /// Resubmits what a restart left in flight, then pops and starts every
    /// available request.
    ///
    /// Requests a filter completes at once (reads from the page cache) are
    /// signalled as [`notify_now`] says, not only after the whole batch, so
    /// the guest refills the ring while the rest are decrypted.
    fn take_requests(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        mem: &Arc<GuestMem>,
    ) -> io::Result<()> {
        let now = Instant::now();
        while let Some(head) = self.resubmit.pop_front() {
            let queue = state.get_queue_mut();
            let table = GuestAddress(queue.desc_table());
            let chain = Chain::new(mem, table, queue.size(), head);
            self.take(head, chain, queue, mem, now);
        }
        loop {
            if notify_now(self.unsignalled_bytes, self.unsignalled, || {
                avail_left(state.get_queue(), mem)
            }) {
                self.notify(state)?;
            }
            let queue = state.get_queue_mut();
            let Some(chain) = queue.pop_descriptor_chain(&**mem) else {
                break;
            };
            let head = chain.head_index();
            if self.is_taken(head) {
                warn_limited!(
                    queue = self.index,
                    head,
                    "the guest published a request again while it is in flight; ignored"
                );
                continue;
            }
            self.set_taken(head, true);
            if let Some(inflight) = &self.inflight {
                inflight.take(head, self.counter);
                self.counter += 1;
            }
            self.take(head, chain, queue, mem, now);
        }
        self.count_returned();
        Ok(())
    }

    /// Counts the requests returned since the last call, with one reading
    /// of the clock: their latency runs to the end of their batch.
    fn count_returned(&mut self) {
        if self.returned_now.is_empty() {
            return;
        }
        let now = Instant::now();
        for r in self.returned_now.drain(..) {
            self.metrics.complete(
                r.op,
                r.bytes,
                r.status,
                now.saturating_duration_since(r.started),
            );
        }
    }

    /// Parses the chain at `head` and starts it, or refuses it.
    fn take(
        &mut self,
        head: u16,
        descs: impl Iterator<Item = Descriptor>,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
        now: Instant,
    ) {
        let idx = self.alloc_slot();
        self.metrics.take();
        let slot = &mut self.slots[idx];
        slot.req.started = now;
        match request::parse(mem, head, descs, &self.limits, &mut slot.req) {
            Ok(()) => {
                slot.mem = Some(mem.clone());
                slot.stage = 0;
                slot.done = 0;
                slot.punch_fallback = false;
                slot.syncing = false;
                self.start(idx, queue, mem, now);
            }
            Err(e) => self.refuse(idx, e, queue, mem),
        }
    }

    /// Spins for up to the polling window; true when new requests arrived.
    /// Storage completions found meanwhile are completed and notified.
    fn poll_for_work(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        mem: &GuestMem,
    ) -> io::Result<bool> {
        // Storage still working in kernel threads (buffered writes in
        // io-wq after an inline write blocked) or librbd's: spinning would
        // take a CPU those threads need; its eventfd wakes us instead. Direct
        // I/O waits at the device: at a shallow depth, where every
        // completion would otherwise cost a sleep and a wake-up in its
        // latency, spinning catches it (as QEMU's polling does); deeper
        // queues complete in batches, and spinning would only take CPU.
        if self.poll_ns == 0
            || self.stopped
            || !spins_with(self.storage.in_flight(), self.storage.polls_in_flight())
        {
            return Ok(false);
        }
        let deadline = Instant::now() + Duration::from_nanos(self.poll_ns);
        let mut spins = 0u32;
        loop {
            let queue = state.get_queue_mut();
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(io::Error::other)?;
            if avail.0 != queue.next_avail() {
                return Ok(true);
            }
            if self.storage.has_completions() {
                self.complete_reaped(state, mem)?;
                self.notify(state)?;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(32) && Instant::now() >= deadline {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Adjusts the polling window from how long the thread was idle.
    fn adapt_poll(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let slept = now.saturating_duration_since(since).as_nanos() as u64;
        if self.poll_max_ns == 0 {
            return;
        }
        if slept <= self.poll_max_ns {
            // Woken soon after going idle: polling that long would have caught it.
            self.poll_ns = (self.poll_ns.max(4_000) * 2)
                .min(self.poll_max_ns)
                .max(slept);
        } else {
            self.poll_ns /= 2;
            if self.poll_ns < 4_000 {
                self.poll_ns = 0;
            }
        }
    }

    /// The timer fired: retry delayed requests, in order, and resubmit what
    /// a restart left in flight once the ring runs.
    pub fn on_timer(&mut self, vring: &Vring) -> io::Result<()> {
        self.timer.consume();
        let resumed = if std::mem::take(&mut self.resume) {
            self.service(vring)
        } else {
            Ok(())
        };
        if resumed.is_err() {
            // Notifications may be off: come back rather than wait for a
            // kick that may never come.
            let _ = self.resume_soon();
        }
        self.run_deferred(vring, false)?;
        let r = self.poll_recovery(vring);
        self.count_returned();
        resumed.and(r)
    }

    /// Requests in flight before a restart are resubmitted without waiting
    /// for the guest to kick (it may be waiting for them and have nothing
    /// new to submit): until the ring runs, the timer checks every 10 ms, for
    /// at most `RECOVERY_WAIT` after the region arrived.
    fn poll_recovery(&mut self, vring: &Vring) -> io::Result<()> {
        let now = Instant::now();
        if !self.recover_pending || self.recover_until.is_none_or(|t| now >= t) {
            return Ok(());
        }
        let runs = vring.get_ref().get_queue().ready() && self.handover.is_held();
        if runs && !self.stopped {
            self.service(vring)?;
        }
        if self.recover_pending {
            self.timer.arm(now + Duration::from_millis(10))?;
        }
        Ok(())
    }

    /// Completes everything taken from the ring: delayed requests go down
    /// without further delay, and in-flight I/O is waited for. Used before
    /// the frontend takes the ring back and on shutdown.
    pub fn drain(&mut self) -> io::Result<()> {
        let Some(vring) = self.vring.clone() else {
            return Ok(());
        };
        self.run_deferred(&vring, true)?;
        let mem = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        while self.storage.in_flight() > 0 {
            wait_for_storage(&mut self.storage, self.index);
            self.complete_reaped(&mut state, &mem)?;
        }
        self.count_returned();
        self.notify(&mut state)
    }

    /// The disk grew (a live resize, with this queue paused): requests are
    /// checked against the new capacity from now on.
    pub fn set_capacity(&mut self, bytes: u64) {
        self.limits.capacity = bytes;
    }

    /// Stops taking requests from the ring, then drains it.
    pub fn stop(&mut self) -> io::Result<()> {
        self.stopped = true;
        self.drain()
    }

    /// Tells the guest about returned requests, if any, as EVENT_IDX allows.
    fn notify(&mut self, state: &mut VringState<GuestMemAtomic>) -> io::Result<()> {
        self.unsignalled_bytes = 0;
        self.unsignalled = 0;
        if !std::mem::take(&mut self.returned) {
            return Ok(());
        }
        if state.needs_notification().map_err(io::Error::other)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn alloc_slot(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.slots.push(Slot::default());
        self.slots.len() - 1
    }

    /// A chain that did not parse: report the status, or return it unused.
    fn refuse(&mut self, idx: usize, e: ParseError, queue: &mut Queue, mem: &GuestMem) {
        tracing::debug!(queue = self.index, head = self.slots[idx].req.head, "{e}");
        let status = match e {
            ParseError::Refused { status, .. } => Some(status),
            ParseError::Broken(_) => None,
        };
        let req = &self.slots[idx].req;
        match status {
            // A request of a known type that fails: counted as one.
            Some(st) if req.op_known => self.returned_now.push(Returned {
                op: req.op,
                bytes: 0,
                status: st,
                started: req.started,
            }),
            _ => self.metrics.refuse(),
        }
        self.give_back(idx, status, 0, queue, mem);
    }

    /// Writes the status byte (if the chain has one), returns the chain to
    /// the guest with `written` data bytes, and frees its slot.
    ///
    /// While QEMU migrates, the guest pages written for the request (data
    /// read from storage or decrypted, GET_ID, the status byte) are logged
    /// before the used element is published, and the used ring after; the
    /// in-flight region brackets the used element (see `inflight`).
    fn give_back(
        &mut self,
        idx: usize,
        status: Option<Status>,
        written: u32,
        queue: &mut Queue,
        mem: &GuestMem,
    ) {
        self.free.push(idx);
        let req = &self.slots[idx].req;
        let head = req.head;
        if !self.is_taken(head) {
            tracing::error!(
                queue = self.index,
                head,
                "request returned twice; not published"
            );
            return;
        }
        let used = match status {
            Some(st) => {
                if mem.write_obj(st as u8, req.status_addr).is_err() {
                    tracing::warn!(queue = self.index, "status byte no longer in guest memory");
                }
                written + 1
            }
            None => 0,
        };
        if let Some(log) = &self.dirty_log {
            for &(addr, len) in &req.dirty {
                log.mark(addr, len);
            }
            if status.is_some() {
                log.mark(req.status_addr, 1);
            }
        }
        if let Some(inflight) = &self.inflight {
            inflight.begin_return(head);
        }
        if let Err(e) = queue.add_used(mem, head, used) {
            tracing::warn!(
                queue = self.index,
                "cannot return a request to the ring: {e}"
            );
        }
        if let Some(inflight) = &self.inflight {
            inflight.end_return(head, queue.next_used());
        }
        self.log_used_ring(queue);
        self.set_taken(head, false);
        self.returned = true;
    }

    /// Sends slot `idx` down the pipeline from the stage it stands at, then to
    /// storage. Returns when to retry it if a filter delayed it; the caller
    /// queues it.
    fn run_pipeline(
        &mut self,
        idx: usize,
        force: bool,
        queue: &mut Queue,
        mem: &GuestMem,
        now: Instant,
    ) -> Option<Instant> {
        let slot = &mut self.slots[idx];
        match self.pipeline.submit(&mut slot.req, slot.stage, now, force) {
            Outcome::ToStorage => {
                slot.stage = self.pipeline.len();
                self.submit_to_storage(idx, queue, mem);
                None
            }
            Outcome::Completed { stage, status } => {
                slot.stage = stage;
                self.finish(idx, status, queue, mem);
                None
            }
            Outcome::Delayed { stage, until } => {
                slot.stage = stage;
                slot.until = Some(until);
                Some(until)
            }
        }
    }

    /// Sends a new request down the pipeline; a delayed one waits in order.
    fn start(&mut self, idx: usize, queue: &mut Queue, mem: &GuestMem, now: Instant) {
        if let Some(until) = self.run_pipeline(idx, false, queue, mem, now) {
            self.deferred.push_back(idx);
            if let Err(e) = self.timer.arm(until) {
                tracing::error!(queue = self.index, "cannot arm timer: {e}");
            }
        }
    }

    fn run_deferred(&mut self, vring: &Vring, force: bool) -> io::Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let mem = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let now = Instant::now();
        while let Some(&idx) = self.deferred.front() {
            let slot = &mut self.slots[idx];
            if !force && slot.until.is_some_and(|t| t > now) {
                let t = slot.until.unwrap();
                self.timer.arm(t)?;
                break;
            }
            self.deferred.pop_front();
            slot.until = None;
            if let Some(until) = self.run_pipeline(idx, force, queue, &mem, now) {
                // Still waiting: keep its place at the front.
                self.deferred.push_front(idx);
                self.timer.arm(until)?;
                break;
            }
        }
        self.count_returned();
        self.kick_storage(&mut state, &mem)?;
        self.notify(&mut state)
    }

    /// Hands slot `idx` (or the rest of it, after a short transfer) to storage.
    fn submit_to_storage(&mut self, idx: usize, queue: &mut Queue, mem: &GuestMem) {
        let base = self.disk.data_offset;
        let slot = &mut self.slots[idx];
        let req = &mut slot.req;
        let result = match req.op {
            Op::GetId => {
                let n = write_id(&req.iovs, &self.disk.serial);
                req.written = n as u32;
                Submitted::Done(n as i64)
            }
            // Nothing to transfer: done, without a system call.
            Op::Read | Op::Write if req.len == 0 => Submitted::Done(0),
            Op::Read | Op::Write => {
                let iovs: &[Iov] = if let Some(b) = req.bounce.as_mut() {
                    let done = slot.done as usize;
                    slot.tail.clear();
                    // SAFETY: done < bounce length, so the range stays inside
                    // the buffer, which the slot keeps until completion.
                    slot.tail.push(unsafe {
                        Iov::new(b.buf.as_mut_ptr().add(done), b.buf.len() - done)
                    });
                    &slot.tail
                } else if slot.done == 0 {
                    &req.iovs
                } else {
                    advance(&req.iovs, slot.done, &mut slot.tail);
                    &slot.tail
                };
                let offset = base + req.offset + slot.done;
                let op = if req.op == Op::Read {
                    IoOp::Read { offset, iovs }
                } else {
                    IoOp::Write { offset, iovs }
                };
                // SAFETY: the iovs point into guest memory the slot's memory
                // snapshot keeps mapped, or into its bounce buffer; the
                // iovec array is the request's or the slot's `tail`. The
                // slot is not reused, nor these freed, before storage
                // returns the tag (the worker's Drop waits for that too).
                unsafe { self.storage.submit(idx as u64, op) }
            }
            // SAFETY: a flush names no buffer.
            Op::Flush => unsafe { self.storage.submit(idx as u64, IoOp::Flush) },
            Op::Discard | Op::WriteZeroes { .. } => {
                let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                // Write-zeroes may unmap: a hole punch, or zero-range when the
                // storage cannot punch (and the other way round without
                // unmap); a discard only ever punches.
                let mode = match req.op {
                    Op::WriteZeroes { unmap } if unmap == slot.punch_fallback => zero,
                    _ => punch,
                };
                // SAFETY: fallocate names no buffer.
                unsafe {
                    self.storage.submit(
                        idx as u64,
                        IoOp::Fallocate {
                            offset: base + req.offset,
                            len: req.len,
                            mode,
                            zeroes: matches!(req.op, Op::WriteZeroes { .. }),
                        },
                    )
                }
            }
        };
        if let Submitted::Done(res) = result {
            self.on_result(idx, res, queue, mem);
        }
    }

    /// Submits what was pushed and completes whatever storage has finished.
    fn kick_storage(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        mem: &GuestMem,
    ) -> io::Result<()> {
        if let Err(e) = self.storage.kick(0) {
            tracing::error!(queue = self.index, "io_uring submit failed: {e}");
        }
        self.complete_reaped(state, mem)
    }

    /// Completes what storage has finished. The guest is told every
    /// `NOTIFY_EVERY` completions rather than once at the end, so that it
    /// works on the first ones while filters (decryption) finish the rest.
    fn complete_reaped(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        mem: &GuestMem,
    ) -> io::Result<()> {
        loop {
            let mut reaped = std::mem::take(&mut self.reaped);
            self.storage
                .reap(|tag, res| reaped.push((tag as usize, res)));
            if reaped.is_empty() {
                self.reaped = reaped;
                return Ok(());
            }
            for chunk in reaped.chunks(NOTIFY_EVERY) {
                for &(idx, res) in chunk {
                    self.on_result(idx, res, state.get_queue_mut(), mem);
                }
                if chunk.len() == NOTIFY_EVERY {
                    self.notify(state)?;
                }
            }
            self.count_returned();
            reaped.clear();
            self.reaped = reaped;
            // Completions may have queued continuations: start them.
            if let Err(e) = self.storage.kick(0) {
                tracing::error!(queue = self.index, "io_uring submit failed: {e}");
                return Ok(());
            }
        }
    }

    /// Storage finished (part of) slot `idx` with `res` (bytes or -errno).
    fn on_result(&mut self, idx: usize, res: i64, queue: &mut Queue, mem: &GuestMem) {
        let slot = &mut self.slots[idx];
        let req = &slot.req;
        if slot.syncing {
            // The fdatasync of a write-through write.
            let status = if res < 0 {
                let e = io::Error::from_raw_os_error(-res as i32);
                warn_limited!(queue = self.index, op = ?req.op, offset = req.offset, len = req.len, "write-through fdatasync failed: {e}");
                Status::IoErr
            } else {
                Status::Ok
            };
            self.finish(idx, status, queue, mem);
            return;
        }
        let op = req.op;
        let status = match req.op {
            Op::Read | Op::Write if req.len == 0 && res == 0 => Status::Ok,
            Op::Read | Op::Write if res > 0 => {
                slot.done += res as u64;
                let total = match &req.bounce {
                    Some(b) => b.buf.len() as u64,
                    None => req.len,
                };
                if slot.done < total {
                    // Short transfer: continue with the rest.
                    self.submit_to_storage(idx, queue, mem);
                    return;
                }
                if req.op == Op::Read {
                    slot.req.written = req.len as u32;
                }
                Status::Ok
            }
            Op::Read | Op::Write => {
                let what = if res == 0 {
                    "unexpected end of image".to_string()
                } else {
                    io::Error::from_raw_os_error(-res as i32).to_string()
                };
                warn_limited!(queue = self.index, op = ?req.op, offset = req.offset, len = req.len, "I/O error: {what}");
                Status::IoErr
            }
            Op::WriteZeroes { .. }
                if res == -i64::from(libc::EOPNOTSUPP) && !slot.punch_fallback =>
            {
                slot.punch_fallback = true;
                self.submit_to_storage(idx, queue, mem);
                return;
            }
            _ if res < 0 => {
                let e = io::Error::from_raw_os_error(-res as i32);
                warn_limited!(queue = self.index, op = ?req.op, offset = req.offset, len = req.len, "I/O error: {e}");
                Status::IoErr
            }
            _ => Status::Ok,
        };
        if status == Status::Ok
            && matches!(op, Op::Write | Op::WriteZeroes { .. })
            && !self.disk.write_cache.is_on()
        {
            // Write-through: make it durable before the guest hears of it.
            self.slots[idx].syncing = true;
            // SAFETY: a flush names no buffer.
            if let Submitted::Done(res) = unsafe { self.storage.submit(idx as u64, IoOp::Flush) } {
                self.on_result(idx, res, queue, mem);
            }
            return;
        }
        self.finish(idx, status, queue, mem);
    }

    /// Runs the completion up the pipeline, writes the status, returns the chain.
    fn finish(&mut self, idx: usize, status: Status, queue: &mut Queue, mem: &GuestMem) {
        let slot = &mut self.slots[idx];
        let status = self.pipeline.complete(&mut slot.req, slot.stage, status);
        let req = &slot.req;
        self.unsignalled_bytes += req.len;
        self.unsignalled += 1;
        self.returned_now.push(Returned {
            op: req.op,
            bytes: req.len,
            status,
            started: req.started,
        });
        let written = if status == Status::Ok {
            slot.req.written
        } else {
            0
        };
        slot.mem = None;
        slot.req.bounce = None;
        self.give_back(idx, Some(status), written, queue, mem);
    }
}

impl Drop for QueueWorker {
    /// Storage operations still in flight point into guest memory and
    /// bounce buffers that the slots keep mapped: wait for them before the
    /// slots (and the ring) are freed. `stop` normally leaves none.
    fn drop(&mut self) {
        while self.storage.in_flight() > 0 {
            wait_for_storage(&mut self.storage, self.index);
            self.storage.reap(|_, _| {});
        }
    }
}

/// How long a queue keeps retrying to wait for storage that fails to say
/// whether its requests are done, before it aborts the process.
const STORAGE_WAIT_RETRIES: u32 = 500;

/// Waits for at least one completion. The requests in flight point into
/// guest memory and bounce buffers: going on (to unmap, free or unlock)
/// while the kernel may still write them is never an option. A failing
/// wait is retried; one that keeps failing aborts the process, whose
/// memory the kernel then keeps until the requests are done, and whose
/// image lock lasts as long (see `Image::ring_file`).
fn wait_for_storage(storage: &mut QueueStorage, queue: usize) {
    let mut failures = 0;
    while let Err(e) = storage.kick(1) {
        failures += 1;
        if failures == 1 || failures % 100 == 0 {
            tracing::error!(queue, failures, "waiting for storage: {e}; retrying");
        }
        if failures >= STORAGE_WAIT_RETRIES {
            tracing::error!(
                queue,
                "storage never said whether {} requests are done: aborting rather than \
                 freeing memory it may still write",
                storage.in_flight()
            );
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the serial number into the GET_ID buffers; returns the bytes written.
fn write_id(iovs: &[Iov], serial: &[u8; ID_BYTES]) -> usize {
    let mut src = &serial[..];
    let mut n = 0;
    for iov in iovs {
        let k = iov.len().min(src.len());
        // SAFETY: the iov lies in guest memory that the request keeps mapped,
        // and is a device-writable buffer of at least `iov.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), iov.base(), k) };
        n += k;
        src = &src[k..];
        if src.is_empty() {
            break;
        }
    }
    n
}

/// Fills `out` with the part of `iovs` past the first `skip` bytes.
fn advance(iovs: &[Iov], mut skip: u64, out: &mut Vec<Iov>) {
    out.clear();
    for iov in iovs {
        if skip >= iov.len() as u64 {
            skip -= iov.len() as u64;
            continue;
        }
        out.push(iov.skip(skip as usize));
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_spin_only_on_requests_at_the_device_and_shallow_queues() {
        // Nothing in flight: polling for new requests, on any storage.
        assert!(spins_with(0, false));
        assert!(spins_with(0, true));
        // Kernel or librbd threads at work: never take their CPU.
        assert!(!spins_with(1, false));
        // Direct I/O: while the queue is shallow.
        assert!(spins_with(1, true));
        assert!(spins_with(POLL_IN_FLIGHT_MAX, true));
        assert!(!spins_with(POLL_IN_FLIGHT_MAX + 1, true));
    }

    #[test]
    fn completions_are_signalled_as_the_ring_runs_dry() {
        let never = || -> u16 { panic!("the ring is not read here") };
        let k = |n: u64| n << 10;
        // Little done: the batch's end signals it.
        assert!(!notify_now(0, 0, never));
        assert!(!notify_now(NOTIFY_BYTES - 1, 1, never));
        // Small requests: signalled every NOTIFY_BYTES, however full the ring.
        assert!(notify_now(NOTIFY_BYTES, NOTIFY_BYTES / k(4), never));
        // Large ones: once the ring is about to run dry.
        assert!(!notify_now(k(256), 2, || NOTIFY_LOW_WATER + 1));
        assert!(notify_now(k(256), 2, || NOTIFY_LOW_WATER));
        assert!(notify_now(k(768), 6, || 0));
        // A long batch is signalled on the way, however full the ring.
        assert!(notify_now(NOTIFY_MAX_BYTES, 8, never));
    }

    #[test]
    fn advance_skips_whole_and_partial_segments() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        // SAFETY: a and b outlive the iovs.
        let iovs = unsafe { [Iov::new(a.as_mut_ptr(), 8), Iov::new(b.as_mut_ptr(), 8)] };
        let mut out = Vec::new();
        advance(&iovs, 11, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 5);
        assert_eq!(out[0].base(), b.as_mut_ptr().wrapping_add(3));
        advance(&iovs, 0, &mut out);
        assert_eq!(out.len(), 2);
    }
}
