//! vmcrypt: a vhost-user-blk backend that serves a disk image to QEMU through
//! a pipeline of filters.
//!
//! The modules follow the data path of a request:
//!
//! 1. [`server`] owns the unix socket and accepts one frontend at a time.
//! 2. [`device`] is the vhost-user-blk device: features, config space, queues.
//! 3. [`worker`] runs one virtqueue: pops descriptor chains, parses them with
//!    [`request`], passes them through the [`filter`] pipeline down to the
//!    [`storage`] sink (buffered writes on the queue thread itself:
//!    [`inline_write`]), and completes them back to the guest.
//! 4. Around the data path, the device's life: [`inflight`] records the
//!    requests each queue has taken so a restarted daemon resubmits them,
//!    [`dirty`] logs the guest memory vmcrypt writes while QEMU migrates, and
//!    [`handover`] keeps the image lock with the running device.
//! 5. Around the process: [`seccomp`] narrows the syscalls it may make once
//!    started.

// Every unsafe block says why it is sound (CI runs clippy with -D warnings).
#![warn(clippy::undocumented_unsafe_blocks)]

/// Logs a warning at most once a second per call site: what a guest or a
/// failing disk can cause per request must not flood the log.
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if LAST.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
            tracing::warn!($($arg)*);
        }
    }};
}

pub mod clone;
pub mod commands;
pub mod config;
pub mod control;
pub mod device;
pub mod direct;
pub mod dirty;
pub mod filter;
pub mod handover;
pub mod inflight;
pub mod inline_write;
pub mod keys;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod pagecache;
pub mod rbd;
pub mod request;
pub mod seccomp;
pub mod server;
pub mod storage;
pub mod worker;

mod sys;

/// Guest memory as mapped from the frontend's memory table.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;
/// The atomically replaceable view of guest memory the vhost-user crates use.
pub type GuestMemAtomic = vm_memory::GuestMemoryAtomic<GuestMem>;
