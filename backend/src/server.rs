//! Serving: owns the socket, accepts one frontend at a time (a fresh device
//! per connection, the image kept open across them), and handles signals.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use crate::config::{CacheMode, ImageSpec, ServeConfig};
use crate::control::{Control, Served, StatusInfo};
use crate::device::{BlockDevice, DeviceSettings};
use crate::direct::{self, DirectError, DirectIo};
use crate::filter::{self, Encrypt, Filter, Throttle};
use crate::handover::Handover;
use crate::keys::{self, ImageFormat, KeyDescriptor, KeyError, KeyOrigin};
use crate::listen::{self, ListenError, Listening};
use crate::request::{Limits, ID_BYTES};
use crate::storage::{self, Image, StorageError};
use crate::worker::{Capacity, DiskInfo};
use crate::GuestMem;

/// Errors that stop `serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Filter(#[from] filter::FilterError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Direct(#[from] DirectError),
    #[error("vhost-user: {0}")]
    VhostUser(vhost_user_backend::Error),
    #[error("registering the queues' storage and timer fds: {0}")]
    RegisterFds(#[source] io::Error),
    #[error("signal handling: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("control socket: {0}")]
    Control(#[source] io::Error),
    #[error(transparent)]
    Rbd(#[from] crate::rbd::RbdError),
    #[error("{what} {path}: {source}")]
    Folder {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("--metrics-listen {addr}: cannot listen: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// Largest data segment we accept, and the most segments per request.
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = 126;
/// Largest discard (a hole punch, cheap) and write-zeroes range.
const MAX_DISCARD: u64 = 1 << 30;
const MAX_WRITE_ZEROES: u64 = 8 << 20;

/// What the signal thread needs to shut down cleanly.
struct Shared {
    /// The socket file to remove at shutdown, if vmcrypt created it.
    socket: Option<SocketFile>,
    /// The control socket, removed at shutdown.
    control: Option<SocketFile>,
    image: Arc<Image>,
    filters: Vec<Arc<dyn Filter>>,
    /// The device of the connected frontend, or the one waiting for it.
    current: Arc<Mutex<Option<BlockDevice>>>,
    /// Who holds the image: shutdown flushes and releases it through this,
    /// so that it never flushes an image a stopping device just released
    /// (RBD refuses that: the exclusive lock is gone).
    handover: Arc<Handover>,
}

/// Serves `cfg` until SIGINT or SIGTERM; returns only on a start-up error.
///
/// A LUKS image is opened with its key (from its key descriptor, or
/// `--passphrase-file`) and served through the `encrypt` filter, below any
/// configured filter; the guest sees the payload.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    // The socket first: systemd's variables are read (and cleared) before
    // any thread starts, and a bad handed-in fd fails before keys are
    // fetched.
    let listening = listen::open(&cfg.socket, cfg.socket_mode, cfg.socket_group.as_deref())?;
    // Removed by its folder's descriptor: the daemon confined by seccomp
    // may remove names there, and nowhere else.
    let owned = match &listening.owned_path {
        Some(path) => Some(SocketFile::new(path, "the socket's folder")?),
        None => None,
    };
    open_and_serve(cfg, listening, owned)
}

/// What `serve` found out while opening the image, for the control socket.
struct Opened {
    image: Image,
    filters: Vec<Arc<dyn Filter>>,
    /// The pipeline's throttle, if it has one.
    throttle: Option<Arc<Throttle>>,
    format: &'static str,
    key: Option<KeyOrigin>,
    /// An encrypted image's key descriptor (copied beside snapshots).
    descriptor: Option<KeyDescriptor>,
}

fn open_and_serve(
    cfg: ServeConfig,
    listening: Listening,
    socket: Option<SocketFile>,
) -> Result<(), ServeError> {
    let opened = open(&cfg)?;
    serve_image(cfg, listening, socket, opened)
}

/// Builds the filters and opens the image (unlocking it for a LUKS one).
fn open(cfg: &ServeConfig) -> Result<Opened, ServeError> {
    let queues = usize::from(cfg.num_queues);
    let mut throttle: Option<Arc<Throttle>> = None;
    let mut filters: Vec<Arc<dyn Filter>> = Vec::with_capacity(cfg.filters.len() + 2);
    for spec in &cfg.filters {
        if spec.name == "throttle" && throttle.is_none() {
            let t = Arc::new(Throttle::new(spec, queues)?);
            throttle = Some(t.clone());
            filters.push(t);
        } else {
            filters.push(filter::build(spec, queues)?);
        }
    }
    // The control socket's set-throttle needs a throttle in the pipeline:
    // without a configured one, one with no limits goes first.
    if cfg.control.is_some() && throttle.is_none() {
        let t = Arc::new(Throttle::unlimited(queues));
        filters.insert(0, t.clone());
        throttle = Some(t);
    }
    let mut descriptor = None;
    let mut descriptor_for_snapshots = None;
    let (image, format, key) = match &cfg.image {
        ImageSpec::Null { size } => (Image::Null { capacity: *size }, "raw", None),
        ImageSpec::Rbd(spec) => {
            let rbd = Arc::new(crate::rbd::RbdImage::open(spec, &cfg.ceph, cfg.read_only)?);
            tracing::info!(image = %spec, size = rbd.size(), "RBD image open");
            let name = PathBuf::from(spec.to_string());
            let (descriptor, at) = keys::rbd_descriptor(&rbd)?;
            let has_header = keys::is_luks(&*rbd);
            let luks = match cfg.format {
                Some(f) => f == ImageFormat::Luks,
                None => descriptor.is_some() || cfg.keys.passphrase_file.is_some(),
            };
            let refuse = |why: &str| {
                ServeError::Key(KeyError::Format {
                    image: name.clone(),
                    reason: why.into(),
                })
            };
            if luks && !has_header {
                return Err(refuse(
                    "it is to be served decrypted but has no LUKS header (damaged?)",
                ));
            }
            if !luks && has_header && cfg.format.is_none() {
                return Err(refuse(
                    "it has a LUKS header but no key descriptor in its metadata: give its key \
                     (--passphrase-file) or serve it as it is with --format raw",
                ));
            }
            if luks {
                let unlocked =
                    keys::unlock_blocks(&name, &*rbd, &at, descriptor.clone(), &cfg.keys)?;
                filters.push(Arc::new(
                    Encrypt::new(unlocked.key)
                        .map_err(|e| ServeError::Key(KeyError::BadDataKey(e)))?,
                ));
                descriptor_for_snapshots = descriptor;
                let data_offset = unlocked.header.payload_bytes();
                (
                    Image::Rbd { rbd, data_offset },
                    "luks1",
                    Some(unlocked.origin),
                )
            } else {
                (
                    Image::Rbd {
                        rbd,
                        data_offset: 0,
                    },
                    "raw",
                    None,
                )
            }
        }
        ImageSpec::File(path) => {
            let file = storage::open(path, cfg.read_only)?;
            match keys::decide_format(path, &file, cfg.format, &cfg.keys)? {
                ImageFormat::Luks => {
                    let unlocked = keys::unlock(path, &file, &cfg.keys)?;
                    descriptor = KeyDescriptor::load(path)?;
                    if vmcrypt_crypto::locked::lock_failed() {
                        tracing::warn!(
                            "cannot lock key memory (RLIMIT_MEMLOCK too small?): keys may reach swap; \
                             they are still kept out of core dumps"
                        );
                    }
                    let payload = unlocked.header.payload_bytes();
                    let direct = open_direct(cfg, path, payload)?;
                    let mut image = Image::from_file(file, path, payload, cfg.block_size, direct)?;
                    filters.push(Arc::new(
                        Encrypt::new(unlocked.key)
                            .map_err(|e| ServeError::Key(KeyError::BadDataKey(e)))?
                            .reading_cached_from(image.map_page_cache()),
                    ));
                    (image, "luks1", Some(unlocked.origin))
                }
                ImageFormat::Raw => {
                    let direct = open_direct(cfg, path, 0)?;
                    // Guest buffers direct I/O cannot take are bounced.
                    if let Some(d) = &direct {
                        filters.push(Arc::new(filter::Align::new(d.align)));
                    }
                    let image = Image::from_file(file, path, 0, cfg.block_size, direct)?;
                    (image, "raw", None)
                }
            }
        }
    };
    Ok(Opened {
        image,
        filters,
        throttle,
        format,
        key,
        descriptor: descriptor.or(descriptor_for_snapshots),
    })
}

/// With `--cache none`, the image's O_DIRECT descriptor for the data path.
fn open_direct(
    cfg: &ServeConfig,
    path: &std::path::Path,
    data_offset: u64,
) -> Result<Option<DirectIo>, ServeError> {
    if cfg.cache != CacheMode::None {
        return Ok(None);
    }
    let d = direct::open(path, cfg.read_only, cfg.block_size, data_offset)?;
    tracing::info!(
        mem_align = d.align.mem,
        offset_align = d.align.offset,
        "cache none: direct I/O"
    );
    Ok(Some(d))
}

/// Serves an opened image through its filters on `listening`.
fn serve_image(
    cfg: ServeConfig,
    listening: Listening,
    socket: Option<SocketFile>,
    opened: Opened,
) -> Result<(), ServeError> {
    let image = Arc::new(opened.image);
    let filters = opened.filters;
    let mut serial = [0u8; ID_BYTES];
    serial[..cfg.serial.len()].copy_from_slice(cfg.serial.as_bytes());
    let disk = Arc::new(DiskInfo {
        limits: Limits {
            capacity: image.capacity(),
            block_size: cfg.block_size,
            read_only: cfg.read_only,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            max_discard: MAX_DISCARD,
            max_write_zeroes: MAX_WRITE_ZEROES,
        },
        data_offset: match &*image {
            Image::File { data_offset, .. } => *data_offset,
            Image::Rbd { data_offset, .. } => *data_offset,
            Image::Null { .. } => 0,
        },
        capacity: Capacity::new(image.capacity()),
        serial,
        write_cache: Default::default(),
        metrics: Arc::new(crate::metrics::DiskMetrics::new(usize::from(
            cfg.num_queues,
        ))),
    });
    let connected = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<BlockDevice>>> = Arc::default();
    // What the control socket and the metrics endpoint work on.
    // Where snapshots go: --snapshot-dir, else the image's own folder; held
    // open, as the daemon opens no path once confined.
    let snapshot_dir = match (&cfg.snapshot_dir, &cfg.image) {
        (Some(dir), _) => Some(dir.clone()),
        (None, ImageSpec::File(path)) => Some(match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }),
        _ => None,
    };
    let snapshot_dir = match snapshot_dir {
        Some(path) if cfg.control.is_some() => Some(
            crate::control::SnapshotDir::open(&path).map_err(|source| ServeError::Folder {
                what: "--snapshot-dir",
                path,
                source,
            })?,
        ),
        _ => None,
    };
    let control = (cfg.control.is_some() || cfg.metrics_listen.is_some()).then(|| {
        Arc::new(Control {
            info: status_info(&cfg, opened.format, opened.key.clone(), &filters),
            metrics: disk.metrics.clone(),
            // `open` puts a throttle in the pipeline whenever --control is
            // set; the metrics endpoint alone changes no limit.
            throttle: opened
                .throttle
                .clone()
                .unwrap_or_else(|| Arc::new(Throttle::unlimited(usize::from(cfg.num_queues)))),
            connected: connected.clone(),
            started: std::time::Instant::now(),
            served: Served {
                image: image.clone(),
                disk: disk.clone(),
                device: current.clone(),
                descriptor: opened.descriptor.clone(),
                read_only: cfg.read_only,
                snapshot_dir,
            },
        })
    });
    // Both are bound now, while binding is still allowed.
    // The admin API: a mode and group of its own, never the vhost-user
    // socket's (QEMU's group is no admin).
    let control_socket = match &cfg.control {
        Some(path) => {
            let listener = listen::bind(path, cfg.control_mode, cfg.control_group.as_deref())?;
            let file = SocketFile::new(path, "the control socket's folder")?;
            Some((listener, file))
        }
        None => None,
    };
    let metrics_socket = match cfg.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|source| ServeError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let settings = DeviceSettings {
        num_queues: usize::from(cfg.num_queues),
        queue_size: cfg.queue_size,
        disk: disk.clone(),
        poll_max: std::time::Duration::from_micros(cfg.poll_us),
    };

    // Signals are taken by a thread of their own: block them here, before
    // the control thread and the others start, so every thread inherits
    // the mask.
    let sigset = block_signals().map_err(ServeError::Signals)?;
    // From here on the daemon needs no network and no new programs, and
    // opens no file: narrow the syscalls it may make. The control thread
    // may still create new files (snapshots); the threads started after
    // it, which serve the guest, may not.
    // The queues' rings, made now: once the filter is on, no ring can be
    // made (it would not carry the restrictions).
    image.make_rings(
        usize::from(cfg.num_queues),
        u32::from(cfg.queue_size),
        &disk.metrics.queues,
    )?;
    let rights = crate::seccomp::FileRights {
        create_in: control
            .as_ref()
            .and_then(|c| c.served.snapshot_dir.as_ref())
            .map(|d| d.fd()),
        remove_in: socket
            .iter()
            .chain(control_socket.as_ref().map(|(_, f)| f))
            .map(|f| f.0.dir_fd())
            .collect(),
    };
    crate::seccomp::install(cfg.seccomp, matches!(cfg.image, ImageSpec::Rbd(_)), &rights)?;
    let control_file = match (control_socket, &control) {
        (Some((listener, file)), Some(control)) => {
            crate::control::spawn(listener, control.clone(), cfg.control_allow.clone())
                .map_err(ServeError::Control)?;
            tracing::info!(
                socket = %file.0.path().display(),
                mode = format!("{:04o}", cfg.control_mode),
                allowed_uids = ?cfg.control_allow,
                "control socket listening"
            );
            Some(file)
        }
        _ => None,
    };
    let handover = Arc::new(
        Handover::new(image.clone(), cfg.read_only).tracking(disk.capacity.clone(), cfg.block_size),
    );
    let shared = Arc::new(Shared {
        socket,
        control: control_file,
        image: image.clone(),
        filters: filters.clone(),
        current: current.clone(),
        handover: handover.clone(),
    });
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_loop(sigset, &shared))
            .map_err(ServeError::Signals)?;
    }
    // The control and signal threads are started (they may create, and
    // remove, files: snapshots, the socket files at shutdown); every
    // thread started from here on, those that face the guest and QEMU
    // among them, may not.
    crate::seccomp::confine_this_thread(cfg.seccomp)?;
    if let (Some(listener), Some(control)) = (metrics_socket, &control) {
        let address = listener.local_addr().map_err(ServeError::Control)?;
        crate::control::http::spawn(listener, control.clone()).map_err(ServeError::Control)?;
        tracing::info!(%address, "metrics served over HTTP at /metrics");
    }

    tracing::info!(
        socket = %listening.describe,
        capacity = image.capacity(),
        queues = cfg.num_queues,
        read_only = cfg.read_only,
        filters = ?filters.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "serving; waiting for a frontend"
    );
    crate::notify::notify("READY=1");
    let mut listener = Listener::from(listening.listener);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        // The device is made and published under one lock: a resize either
        // happened before (and its queues start at the new capacity) or
        // finds it.
        let dev = {
            let mut current = lock(&shared.current);
            let dev = BlockDevice::new(
                settings.clone(),
                &image,
                &filters,
                mem.clone(),
                handover.clone(),
            )?;
            *current = Some(dev.clone());
            dev
        };
        let mut daemon = VhostUserDaemon::new("vmcrypt".into(), dev.clone(), mem)
            .map_err(ServeError::VhostUser)?;
        dev.register_fds(&daemon.get_epoll_handlers())
            .map_err(ServeError::RegisterFds)?;
        if let Err(e) = daemon.start(&mut listener) {
            tracing::error!("accepting a frontend: {e}");
            continue;
        }
        connected.store(true, Ordering::Relaxed);
        tracing::info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("frontend connection ended: {e}"),
        }
        // Stop the queues for good before anything is unmapped: what they
        // took completes, nothing more is taken, and the image is flushed
        // and released for whichever daemon runs the device next.
        dev.shut();
        *lock(&shared.current) = None;
        connected.store(false, Ordering::Relaxed);
        // Dropping the daemon joins the queue threads and unmaps guest memory.
    }
}

/// What the control socket's `status` reports that does not change.
fn status_info(
    cfg: &ServeConfig,
    format: &'static str,
    key: Option<KeyOrigin>,
    filters: &[Arc<dyn Filter>],
) -> StatusInfo {
    StatusInfo {
        image: match &cfg.image {
            ImageSpec::File(p) => p.display().to_string(),
            ImageSpec::Null { size } => format!("null:{size}"),
            ImageSpec::Rbd(spec) => spec.to_string(),
        },
        format,
        block_size: cfg.block_size,
        queues: usize::from(cfg.num_queues),
        read_only: cfg.read_only,
        cache: match cfg.cache {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
        },
        filters: filters.iter().map(|f| f.name().to_string()).collect(),
        key,
    }
}

/// A socket file vmcrypt bound: removed when `serve` returns with an
/// error (shutdown removes it by hand, as it exits without unwinding).
/// Removed through its folder's descriptor, which seccomp allows.
struct SocketFile(crate::sys::NameInDir);

impl SocketFile {
    /// Takes charge of the socket vmcrypt just bound at `path`; if its
    /// folder cannot be held, the socket is removed by name and the start
    /// fails.
    fn new(path: &Path, what: &'static str) -> Result<SocketFile, ServeError> {
        crate::sys::NameInDir::new(path)
            .map(SocketFile)
            .map_err(|source| {
                let _ = std::fs::remove_file(path);
                ServeError::Folder {
                    what,
                    path: path.parent().unwrap_or(path).into(),
                    source,
                }
            })
    }

    fn remove(&self) {
        if let Err(e) = self.0.remove() {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(socket = %self.0.path().display(), "removing the socket file: {e}");
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask reads it. No pointers escape.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

fn signal_loop(set: libc::sigset_t, shared: &Shared) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset and `sig` a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        match sig {
            libc::SIGUSR1 => shared.filters.iter().for_each(|f| f.report()),
            _ => shutdown(shared, sig),
        }
    }
}

/// SIGINT/SIGTERM: stop accepting, complete what is in flight, flush, exit 0.
fn shutdown(shared: &Shared, sig: libc::c_int) -> ! {
    tracing::info!(
        signal = sig,
        "shutting down: completing requests in flight (a second signal ends the daemon at once)"
    );
    // Storage that never completes (an RBD cluster whose OSDs are down)
    // would hold the shutdown for good: a second SIGINT or SIGTERM ends the
    // process at once. The kernel keeps what io_uring still writes until it
    // is done; writes not completed were never acknowledged to the guest.
    let spawned = std::thread::Builder::new()
        .name("signals-again".into())
        .spawn(|| {
            if let Ok(set) = block_signals() {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised sigset and `sig` a valid out pointer.
                while unsafe { libc::sigwait(&set, &mut sig) } != 0 || sig == libc::SIGUSR1 {}
                tracing::error!(
                    signal = sig,
                    "second signal: exiting without waiting for storage"
                );
                // SAFETY: ends the process; nothing of this thread runs after.
                unsafe { libc::_exit(1) };
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no thread for a second signal: {e}");
    }
    crate::notify::notify("STOPPING=1");
    for file in shared.socket.iter().chain(&shared.control) {
        file.remove();
    }
    if let Some(dev) = lock(&shared.current).as_ref() {
        dev.stop();
    }
    // Flush and release the image if this daemon's device held it (a
    // device that stopped before did both already).
    let code = match shared.handover.device_stopped() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("flushing the image: {e}");
            1
        }
    };
    // Release the image lock now: the kernel drops io_uring's references to
    // the file only some time after exit, and a restarted daemon must not
    // find the image still locked.
    shared.image.unlock();
    shared.filters.iter().for_each(|f| f.report());
    tracing::info!("stopped");
    std::process::exit(code);
}
