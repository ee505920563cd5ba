//! Images on Ceph RBD through librbd's C API, loaded at run time.
//!
//! `--image rbd:POOL/IMAGE` (or `rbd:POOL/NAMESPACE/IMAGE`) opens the image
//! once per daemon (several handles on one image would pass the exclusive
//! lock back and forth) and every queue submits to that handle with
//! `rbd_aio_readv`/`writev`/`flush`/`discard`/`write_zeroes`. librbd calls a
//! completion callback on one of its own threads; the callback hands the
//! result to the submitting queue (a list and an eventfd the queue thread
//! already polls, as for io_uring).
//!
//! librados and librbd are loaded with `dlopen` when an RBD image is
//! served, so vmcrypt builds and runs without Ceph's libraries where no RBD
//! image is used (Debian: `librbd1`, which QEMU's `qemu-block-extra`
//! already pulls in). All of vmcrypt's unsafe FFI for Ceph is in this file.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::storage::{IoOp, Submitted};

/// Where an RBD image is: `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`,
/// optionally `@SNAPSHOT` (read-only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snapshot: Option<String>,
}

impl RbdSpec {
    /// Parses what follows `rbd:`.
    pub fn parse(s: &str) -> Result<RbdSpec, String> {
        let bad = || {
            format!(
                "'rbd:{s}': expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE (and @SNAPSHOT)"
            )
        };
        let (path, snapshot) = match s.split_once('@') {
            Some((p, snap)) if is_name(snap) => (p, Some(snap.to_string())),
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && !p.contains('\0');
        let (pool, namespace, image) = match parts.as_slice() {
            [pool, image] if ok(pool) && ok(image) => (pool, None, image),
            [pool, ns, image] if ok(pool) && ok(ns) && ok(image) => {
                (pool, Some((*ns).to_string()), image)
            }
            _ => return Err(bad()),
        };
        Ok(RbdSpec {
            pool: (*pool).into(),
            namespace,
            image: (*image).into(),
            snapshot,
        })
    }
}

/// A snapshot name vmcrypt accepts: letters, digits, `-`, `_`, `.`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl std::fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "rbd:{}/{ns}/{}", self.pool, self.image)?,
            None => write!(f, "rbd:{}/{}", self.pool, self.image)?,
        }
        match &self.snapshot {
            Some(snap) => write!(f, "@{snap}"),
            None => Ok(()),
        }
    }
}

/// How to reach the cluster.
#[derive(Clone, Debug)]
pub struct CephOptions {
    /// ceph.conf (monitors, auth, keyring).
    pub conf: PathBuf,
    /// The cephx user, without `client.` (None: librados' default, admin).
    pub id: Option<String>,
    /// How long to keep trying to reach the monitors.
    pub deadline: Duration,
}

impl Default for CephOptions {
    fn default() -> Self {
        CephOptions {
            conf: "/etc/ceph/ceph.conf".into(),
            id: None,
            deadline: Duration::from_secs(30),
        }
    }
}

/// Errors opening an RBD image.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("Ceph: cannot load {lib} ({reason}); install librbd1 (Debian) to serve RBD images")]
    Library { lib: &'static str, reason: String },
    #[error("Ceph: {what}: {source}")]
    Call {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("Ceph: cannot reach the cluster (monitors {monitors}) within {secs} s: {source}")]
    Unreachable {
        monitors: String,
        secs: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "Ceph: {spec}: no answer from the OSDs within {secs} s (are they up? `ceph osd stat`; \
         --ceph-deadline sets half this wait)"
    )]
    NoOsd { spec: String, secs: u64 },
    #[error("Ceph: pool '{pool}' does not exist")]
    NoPool { pool: String },
    #[error("Ceph: image {spec} does not exist")]
    NoImage { spec: String },
    #[error("Ceph: {what}: permission denied for {user} (check its caps and keyring)")]
    Denied { what: String, user: String },
}

type Rados = *mut c_void;
type Ioctx = *mut c_void;
type Image = *mut c_void;
type Completion = *mut c_void;
type Callback = extern "C" fn(Completion, *mut c_void);

/// The functions vmcrypt calls, resolved once.
struct Lib {
    rados_create: unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    rados_conf_get: unsafe extern "C" fn(Rados, *const c_char, *mut c_char, usize) -> c_int,
    rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    rados_shutdown: unsafe extern "C" fn(Rados),
    rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut Ioctx) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(Ioctx),
    rados_ioctx_set_namespace: unsafe extern "C" fn(Ioctx, *const c_char),
    rbd_open: unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    rbd_open_read_only:
        unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(Image) -> c_int,
    rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    rbd_flush: unsafe extern "C" fn(Image) -> c_int,
    rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int,
    rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    rbd_aio_release: unsafe extern "C" fn(Completion),
    rbd_aio_readv: unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
    rbd_read: unsafe extern "C" fn(Image, u64, usize, *mut c_char) -> isize,
    rbd_write: unsafe extern "C" fn(Image, u64, usize, *const c_char) -> isize,
    rbd_metadata_get: unsafe extern "C" fn(Image, *const c_char, *mut c_char, *mut usize) -> c_int,
    rbd_metadata_set: unsafe extern "C" fn(Image, *const c_char, *const c_char) -> c_int,
    rbd_create: unsafe extern "C" fn(Ioctx, *const c_char, u64, *mut c_int) -> c_int,
    rbd_lock_acquire: unsafe extern "C" fn(Image, c_int) -> c_int,
    rbd_lock_release: unsafe extern "C" fn(Image) -> c_int,
    rbd_snap_create: unsafe extern "C" fn(Image, *const c_char) -> c_int,
    rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    rbd_invalidate_cache: unsafe extern "C" fn(Image) -> c_int,
}

/// Resolves `name` in `handle` as a function of type `T`.
///
/// # Safety
/// `T` must be the symbol's real function type.
unsafe fn symbol<T: Copy>(
    handle: *mut c_void,
    lib: &'static str,
    name: &str,
) -> Result<T, RbdError> {
    let c = CString::new(name).expect("symbol names have no NUL");
    // SAFETY: `handle` comes from dlopen and stays loaded (never closed).
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    if p.is_null() {
        return Err(RbdError::Library {
            lib,
            reason: format!("no symbol {name} (librbd too old?)"),
        });
    }
    // SAFETY: a function pointer has the size of a data pointer on the
    // platforms Ceph runs on; the caller vouches for the type.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

fn open_lib(name: &'static str) -> Result<*mut c_void, RbdError> {
    let c = CString::new(name).expect("library names have no NUL");
    // SAFETY: dlopen with a valid C string; the handle is never closed.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a C string (or null) owned by libc.
        let reason = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(RbdError::Library { lib: name, reason });
    }
    Ok(h)
}

fn lib() -> Result<&'static Lib, RbdError> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    let r = LIB.get_or_init(|| load().map_err(|e| e.to_string()));
    r.as_ref().map_err(|reason| RbdError::Library {
        lib: "librbd.so.1",
        reason: reason.clone(),
    })
}

fn load() -> Result<Lib, RbdError> {
    const RADOS: &str = "librados.so.2";
    const RBD: &str = "librbd.so.1";
    let rados = open_lib(RADOS)?;
    let rbd = open_lib(RBD)?;
    // SAFETY: each type below is the function's prototype in
    // rados/librados.h and rbd/librbd.h (librbd 1.16, Ceph Pacific).
    unsafe {
        Ok(Lib {
            rados_create: symbol(rados, RADOS, "rados_create")?,
            rados_conf_read_file: symbol(rados, RADOS, "rados_conf_read_file")?,
            rados_conf_set: symbol(rados, RADOS, "rados_conf_set")?,
            rados_conf_get: symbol(rados, RADOS, "rados_conf_get")?,
            rados_connect: symbol(rados, RADOS, "rados_connect")?,
            rados_shutdown: symbol(rados, RADOS, "rados_shutdown")?,
            rados_ioctx_create: symbol(rados, RADOS, "rados_ioctx_create")?,
            rados_ioctx_destroy: symbol(rados, RADOS, "rados_ioctx_destroy")?,
            rados_ioctx_set_namespace: symbol(rados, RADOS, "rados_ioctx_set_namespace")?,
            rbd_open: symbol(rbd, RBD, "rbd_open")?,
            rbd_open_read_only: symbol(rbd, RBD, "rbd_open_read_only")?,
            rbd_close: symbol(rbd, RBD, "rbd_close")?,
            rbd_get_size: symbol(rbd, RBD, "rbd_get_size")?,
            rbd_resize: symbol(rbd, RBD, "rbd_resize")?,
            rbd_invalidate_cache: symbol(rbd, RBD, "rbd_invalidate_cache")?,
            rbd_flush: symbol(rbd, RBD, "rbd_flush")?,
            rbd_aio_create_completion: symbol(rbd, RBD, "rbd_aio_create_completion")?,
            rbd_aio_get_return_value: symbol(rbd, RBD, "rbd_aio_get_return_value")?,
            rbd_aio_release: symbol(rbd, RBD, "rbd_aio_release")?,
            rbd_aio_readv: symbol(rbd, RBD, "rbd_aio_readv")?,
            rbd_aio_writev: symbol(rbd, RBD, "rbd_aio_writev")?,
            rbd_aio_flush: symbol(rbd, RBD, "rbd_aio_flush")?,
            rbd_aio_discard: symbol(rbd, RBD, "rbd_aio_discard")?,
            rbd_aio_write_zeroes: symbol(rbd, RBD, "rbd_aio_write_zeroes")?,
            rbd_read: symbol(rbd, RBD, "rbd_read")?,
            rbd_write: symbol(rbd, RBD, "rbd_write")?,
            rbd_metadata_get: symbol(rbd, RBD, "rbd_metadata_get")?,
            rbd_metadata_set: symbol(rbd, RBD, "rbd_metadata_set")?,
            rbd_create: symbol(rbd, RBD, "rbd_create")?,
            rbd_lock_acquire: symbol(rbd, RBD, "rbd_lock_acquire")?,
            rbd_lock_release: symbol(rbd, RBD, "rbd_lock_release")?,
            rbd_snap_create: symbol(rbd, RBD, "rbd_snap_create")?,
        })
    }
}

fn errno(rc: i64) -> io::Error {
    io::Error::from_raw_os_error((-rc) as i32)
}

fn cstr(s: &str, what: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Call {
        what: format!("{what} '{s}'"),
        source: io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

/// An open RBD image and the cluster connection behind it.
pub struct RbdImage {
    lib: &'static Lib,
    rados: Rados,
    ioctx: Ioctx,
    image: Image,
    spec: RbdSpec,
    /// The image's size in bytes: read at open, changed by [`RbdImage::grow`].
    size: AtomicU64,
}

// SAFETY: librbd's image handle and librados' handles are thread-safe for
// the calls made here (aio submission from several queue threads, flush,
// size), as QEMU's rbd driver also relies on.
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl std::fmt::Debug for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdImage")
            .field("spec", &self.spec)
            .field("size", &self.size())
            .finish()
    }
}

impl RbdImage {
    /// Connects to the cluster (retrying until the deadline) and opens the
    /// image.
    pub fn open(spec: &RbdSpec, ceph: &CephOptions, read_only: bool) -> Result<Self, RbdError> {
        Self::open_or_create(spec, ceph, read_only, None)
    }

    /// Creates the image (`size` bytes; refused if it exists) and opens it.
    pub fn create(spec: &RbdSpec, ceph: &CephOptions, size: u64) -> Result<Self, RbdError> {
        Self::open_or_create(spec, ceph, false, Some(size))
    }

    /// Opens (or creates) the image on a thread of its own, waited for at
    /// most twice `ceph.deadline`: the monitors' part has a timeout of its
    /// own, but with the OSDs down `rbd_open` and `rbd_create` wait for
    /// them without end (librados sets no OSD timeout, so that guest I/O
    /// waits out an outage rather than failing). The thread left waiting
    /// goes when the process ends, which a failed start does.
    fn open_or_create(
        spec: &RbdSpec,
        ceph: &CephOptions,
        read_only: bool,
        create: Option<u64>,
    ) -> Result<Self, RbdError> {
        let secs = ceph.deadline.as_secs().max(1) * 2;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (s, c) = (spec.clone(), ceph.clone());
        std::thread::Builder::new()
            .name("rbd-open".into())
            .spawn(move || {
                let _ = tx.send(Self::open_or_create_now(&s, &c, read_only, create));
            })
            .map_err(|source| RbdError::Call {
                what: format!("opening {spec}: starting a thread"),
                source,
            })?;
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(r) => r,
            Err(_) => Err(RbdError::NoOsd {
                spec: spec.to_string(),
                secs,
            }),
        }
    }

    fn open_or_create_now(
        spec: &RbdSpec,
        ceph: &CephOptions,
        read_only: bool,
        create: Option<u64>,
    ) -> Result<Self, RbdError> {
        let lib = lib()?;
        // librados starts its threads here: they must not take the signals
        // vmcrypt's signal thread waits for (SIGTERM would end the process
        // without draining), so they start with every signal blocked.
        let _mask = SignalsBlocked::new();
        let user = format!("client.{}", ceph.id.as_deref().unwrap_or("admin"));
        let id = ceph
            .id
            .as_deref()
            .map(|i| cstr(i, "--ceph-id"))
            .transpose()?;
        let call = |what: &str, rc: c_int| -> Result<(), RbdError> {
            if rc >= 0 {
                Ok(())
            } else {
                Err(RbdError::Call {
                    what: what.into(),
                    source: errno(rc.into()),
                })
            }
        };
        let mut rados: Rados = std::ptr::null_mut();
        // SAFETY: out pointer to our handle; a null id means the default user.
        let rc = unsafe {
            (lib.rados_create)(
                &mut rados,
                id.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        call("creating a cluster handle", rc)?;
        let mut me = RbdImage {
            lib,
            rados,
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
            spec: spec.clone(),
            size: AtomicU64::new(0),
        };
        let conf = cstr(&ceph.conf.to_string_lossy(), "--ceph-conf")?;
        // SAFETY: valid handle and C string.
        let rc = unsafe { (lib.rados_conf_read_file)(me.rados, conf.as_ptr()) };
        call(&format!("reading {}", ceph.conf.display()), rc)?;
        let secs = ceph.deadline.as_secs().max(1);
        // No admin socket: it would be a second control surface outside
        // the syscall filter's reach (its thread accepts connections), and
        // two daemons with the same user would fight over its path.
        let settings = [
            ("client_mount_timeout", secs.to_string()),
            ("rados_mon_op_timeout", secs.to_string()),
            ("admin_socket", String::new()),
        ];
        for (key, value) in settings {
            let k = cstr(key, "option")?;
            let v = cstr(&value, "value")?;
            // SAFETY: valid handle and C strings.
            let rc = unsafe { (lib.rados_conf_set)(me.rados, k.as_ptr(), v.as_ptr()) };
            call(&format!("setting {key}"), rc)?;
        }
        // SAFETY: valid, configured handle.
        let rc = unsafe { (lib.rados_connect)(me.rados) };
        if rc < 0 {
            return Err(match -rc {
                libc::EPERM | libc::EACCES => RbdError::Denied {
                    what: "connecting".into(),
                    user,
                },
                _ => RbdError::Unreachable {
                    monitors: me.conf_get("mon_host"),
                    secs,
                    source: errno(rc.into()),
                },
            });
        }
        let pool = cstr(&spec.pool, "pool")?;
        // SAFETY: connected handle, C string, out pointer.
        let rc = unsafe { (lib.rados_ioctx_create)(me.rados, pool.as_ptr(), &mut me.ioctx) };
        if rc < 0 {
            return Err(match -rc {
                libc::ENOENT => RbdError::NoPool {
                    pool: spec.pool.clone(),
                },
                libc::EPERM | libc::EACCES => RbdError::Denied {
                    what: format!("opening pool '{}'", spec.pool),
                    user,
                },
                _ => RbdError::Call {
                    what: format!("opening pool '{}'", spec.pool),
                    source: errno(rc.into()),
                },
            });
        }
        if let Some(ns) = &spec.namespace {
            let ns = cstr(ns, "namespace")?;
            // SAFETY: valid io context and C string.
            unsafe { (lib.rados_ioctx_set_namespace)(me.ioctx, ns.as_ptr()) };
        }
        let name = cstr(&spec.image, "image")?;
        if let Some(size) = create {
            let mut order: c_int = 0;
            // SAFETY: valid io context, C string, out pointer (0: default
            // object size).
            let rc = unsafe { (lib.rbd_create)(me.ioctx, name.as_ptr(), size, &mut order) };
            if rc == -libc::EEXIST {
                return Err(RbdError::Call {
                    what: format!("creating {spec}"),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "it already exists; refusing to overwrite it",
                    ),
                });
            }
            call(&format!("creating {spec}"), rc)?;
        }
        // A snapshot is opened read-only.
        let open = if read_only || spec.snapshot.is_some() {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        let snap = spec
            .snapshot
            .as_deref()
            .map(|s| cstr(s, "snapshot"))
            .transpose()?;
        // SAFETY: valid io context, C strings (or null: no snapshot), out
        // pointer.
        let rc = unsafe {
            open(
                me.ioctx,
                name.as_ptr(),
                &mut me.image,
                snap.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if rc < 0 {
            me.image = std::ptr::null_mut();
            return Err(match -rc {
                libc::ENOENT => RbdError::NoImage {
                    spec: spec.to_string(),
                },
                libc::EPERM | libc::EACCES => RbdError::Denied {
                    what: format!("opening {spec}"),
                    user,
                },
                _ => RbdError::Call {
                    what: format!("opening {spec}"),
                    source: errno(rc.into()),
                },
            });
        }
        let mut size = 0u64;
        // SAFETY: open image, out pointer.
        let rc = unsafe { (lib.rbd_get_size)(me.image, &mut size) };
        call(&format!("size of {spec}"), rc)?;
        me.size = AtomicU64::new(size);
        Ok(me)
    }

    fn conf_get(&self, key: &str) -> String {
        let Ok(k) = CString::new(key) else {
            return "?".into();
        };
        let mut buf = vec![0u8; 1024];
        // SAFETY: valid handle; buf is writable for its length.
        let rc = unsafe {
            (self.lib.rados_conf_get)(self.rados, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if rc < 0 {
            return "?".into();
        }
        CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into())
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// At a device start, after another daemon (a migration's source) may
    /// have written or grown the image: drops what librbd caches of it
    /// (`rbd_invalidate_cache`, as QEMU does at a hand-over) and reads
    /// its size again.
    pub fn refresh(&self) -> io::Result<()> {
        // SAFETY: open image.
        let rc = unsafe { (self.lib.rbd_invalidate_cache)(self.image) };
        if rc < 0 {
            return Err(errno(rc.into()));
        }
        let mut size = 0u64;
        // SAFETY: open image, out pointer.
        let rc = unsafe { (self.lib.rbd_get_size)(self.image, &mut size) };
        if rc < 0 {
            return Err(errno(rc.into()));
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Grows the image to `size` bytes (`rbd_resize`; the new space reads
    /// as zeroes). Never shrinks: a smaller `size` is refused.
    pub fn grow(&self, size: u64) -> io::Result<()> {
        let old = self.size();
        if size < old {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{size} bytes is smaller than the RBD image ({old} bytes)"),
            ));
        }
        // SAFETY: open image; librbd takes the exclusive lock for the
        // operation if this client does not hold it, or asks its holder.
        let rc = unsafe { (self.lib.rbd_resize)(self.image, size) };
        if rc < 0 {
            return Err(errno(rc.into()));
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Takes the image's exclusive lock (librbd's exclusive-lock feature,
    /// with automatic transitions off): while this daemon holds it, no
    /// other client can write. Fails at once if another client holds it
    /// the same way (another vmcrypt whose device runs).
    pub fn lock_exclusive(&self) -> io::Result<()> {
        // SAFETY: open image; 0 is RBD_LOCK_MODE_EXCLUSIVE.
        let rc = unsafe { (self.lib.rbd_lock_acquire)(self.image, 0) };
        if rc < 0 {
            Err(errno(rc.into()))
        } else {
            Ok(())
        }
    }

    /// Releases the lock `lock_exclusive` took.
    pub fn unlock(&self) {
        // SAFETY: open image.
        let rc = unsafe { (self.lib.rbd_lock_release)(self.image) };
        if rc < 0 && rc != -libc::EINVAL {
            tracing::warn!(image = %self.spec, "releasing the RBD lock: {}", errno(rc.into()));
        }
    }

    /// Creates the snapshot `name` of the image (what was written and
    /// flushed until now).
    pub fn snapshot(&self, name: &str) -> io::Result<()> {
        let n = CString::new(name).map_err(io::Error::other)?;
        // SAFETY: open image and C string.
        let rc = unsafe { (self.lib.rbd_snap_create)(self.image, n.as_ptr()) };
        if rc < 0 {
            Err(errno(rc.into()))
        } else {
            Ok(())
        }
    }

    /// The image's metadata value for `key`, if set.
    pub fn metadata_get(&self, key: &str) -> io::Result<Option<String>> {
        let k = CString::new(key).map_err(io::Error::other)?;
        let mut len: usize = 4096;
        loop {
            let mut buf = vec![0u8; len];
            let mut n = len;
            // SAFETY: open image, C string, buffer writable for `n` bytes.
            let rc = unsafe {
                (self.lib.rbd_metadata_get)(self.image, k.as_ptr(), buf.as_mut_ptr().cast(), &mut n)
            };
            match rc {
                0 => {
                    let text = CStr::from_bytes_until_nul(&buf)
                        .map_err(io::Error::other)?
                        .to_string_lossy()
                        .into_owned();
                    return Ok(Some(text));
                }
                rc if rc == -libc::ENOENT => return Ok(None),
                rc if rc == -libc::ERANGE && n > len => len = n,
                rc => return Err(errno(rc.into())),
            }
        }
    }

    /// Sets the image's metadata `key` to `value`.
    pub fn metadata_set(&self, key: &str, value: &str) -> io::Result<()> {
        let k = CString::new(key).map_err(io::Error::other)?;
        let v = CString::new(value).map_err(io::Error::other)?;
        // SAFETY: open image and C strings.
        let rc = unsafe { (self.lib.rbd_metadata_set)(self.image, k.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            Err(errno(rc.into()))
        } else {
            Ok(())
        }
    }

    pub fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    /// Makes every completed write durable (librbd's cache, if on).
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: open image.
        let rc = unsafe { (self.lib.rbd_flush)(self.image) };
        if rc < 0 {
            Err(errno(rc.into()))
        } else {
            Ok(())
        }
    }

    /// Starts `op`; its result (bytes for reads and writes, 0 otherwise, or
    /// a negative errno) reaches `queue` with `tag`.
    ///
    /// # Safety
    /// The buffers `op` names must stay valid until the completion arrives.
    unsafe fn submit(&self, queue: &Arc<RbdCompletions>, tag: u64, op: IoOp<'_>) -> Submitted {
        let read = matches!(op, IoOp::Read { .. });
        let (ok, iovecs) = match op {
            IoOp::Read { iovs, .. } | IoOp::Write { iovs, .. } => (
                iovs.iter().map(|i| i.len() as i64).sum(),
                iovs.iter()
                    .map(|i| libc::iovec {
                        iov_base: i.base().cast(),
                        iov_len: i.len(),
                    })
                    .collect(),
            ),
            IoOp::Flush | IoOp::Fallocate { .. } => (0, Vec::new()),
        };
        // librbd keeps a pointer to a read's iovec array (it copies the data
        // out only at completion): the array lives in `Pending` until then.
        let arg = Box::into_raw(Box::new(Pending {
            queue: queue.clone(),
            tag,
            ok,
            read,
            iovecs,
        }));
        // SAFETY: `arg` is valid until the callback (or an error below)
        // takes it back; the Vec's buffer does not move.
        let (iov_ptr, iov_cnt) = unsafe { ((*arg).iovecs.as_ptr(), (*arg).iovecs.len() as c_int) };
        let mut c: Completion = std::ptr::null_mut();
        // SAFETY: `arg` stays alive until the callback takes it back.
        let rc = unsafe { (self.lib.rbd_aio_create_completion)(arg.cast(), on_complete, &mut c) };
        if rc < 0 {
            // SAFETY: the callback will never run: take `arg` back.
            drop(unsafe { Box::from_raw(arg) });
            return Submitted::Done(rc.into());
        }
        // SAFETY: open image and a fresh completion; the caller keeps the
        // buffers valid until the completion, `Pending` the iovec array.
        let rc = unsafe {
            match op {
                IoOp::Read { offset, .. } => {
                    (self.lib.rbd_aio_readv)(self.image, iov_ptr, iov_cnt, offset, c)
                }
                IoOp::Write { offset, .. } => {
                    (self.lib.rbd_aio_writev)(self.image, iov_ptr, iov_cnt, offset, c)
                }
                IoOp::Flush => (self.lib.rbd_aio_flush)(self.image, c),
                // DISCARD may leave anything behind (librbd skips partial
                // objects); WRITE_ZEROES must read back zeroes, and librbd
                // frees whole objects of it by itself.
                IoOp::Fallocate {
                    offset,
                    len,
                    zeroes,
                    ..
                } => {
                    if zeroes {
                        (self.lib.rbd_aio_write_zeroes)(self.image, offset, len as usize, c, 0, 0)
                    } else {
                        (self.lib.rbd_aio_discard)(self.image, offset, len, c)
                    }
                }
            }
        };
        if rc < 0 {
            // SAFETY: the operation was not started: the callback will not
            // run; release the completion and take `arg` back.
            unsafe {
                (self.lib.rbd_aio_release)(c);
                drop(Box::from_raw(arg));
            }
            return Submitted::Done(rc.into());
        }
        Submitted::Queued
    }
}

/// Synchronous access for the LUKS header (`vmcrypt_crypto::Blocks`).
impl vmcrypt_crypto::Blocks for RbdImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = buf.len().min(self.size().saturating_sub(offset) as usize);
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: open image; `buf` is writable for `len` bytes.
        let rc = unsafe { (self.lib.rbd_read)(self.image, offset, len, buf.as_mut_ptr().cast()) };
        if rc < 0 {
            Err(errno(rc as i64))
        } else {
            Ok(rc as usize)
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // SAFETY: open image; `buf` is readable for its length.
        let rc =
            unsafe { (self.lib.rbd_write)(self.image, offset, buf.len(), buf.as_ptr().cast()) };
        if rc < 0 {
            Err(errno(rc as i64))
        } else if (rc as usize) < buf.len() {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))
        } else {
            Ok(())
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.flush()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(RbdImage::size(self))
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: each handle is closed once, image before io context before
        // cluster; null ones were never opened.
        unsafe {
            if !self.image.is_null() {
                (self.lib.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            (self.lib.rados_shutdown)(self.rados);
        }
    }
}

/// The asynchronous signals blocked in this thread (and the threads it
/// starts) until dropped.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data initialised by sigfillset /
        // pthread_sigmask; no pointer escapes.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // Faults stay deliverable, and SIGSYS: the syscall filter's
            // report of a forbidden call.
            for sig in [
                libc::SIGSYS,
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
            ] {
                libc::sigdelset(&mut all, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// What a completion callback needs: whose it is and what success means.
struct Pending {
    queue: Arc<RbdCompletions>,
    tag: u64,
    ok: i64,
    /// A read, whose result is the bytes librbd read: fewer than asked is
    /// a short read, passed on as such (never reported as full).
    read: bool,
    /// The buffers of a read or write, for as long as librbd may use them.
    iovecs: Vec<libc::iovec>,
}

/// Completions of one queue, filled by librbd's threads.
pub struct RbdCompletions {
    done: Mutex<Vec<(u64, i64)>>,
    eventfd: EventFd,
}

extern "C" fn on_complete(c: Completion, arg: *mut c_void) {
    // SAFETY: `arg` is the Box made in `submit`, handed back exactly once.
    let p = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the completion librbd passes to its own callback.
    let rc = unsafe {
        let lib = lib().expect("loaded before any submission");
        let rc = (lib.rbd_aio_get_return_value)(c) as i64;
        (lib.rbd_aio_release)(c);
        rc
    };
    let res = match rc {
        rc if rc < 0 => rc,
        rc if p.read && rc < p.ok => rc,
        _ => p.ok,
    };
    p.queue
        .done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((p.tag, res));
    let _ = p.queue.eventfd.write(1);
}

/// One queue's access to an RBD image.
pub struct RbdQueue {
    image: Arc<RbdImage>,
    completions: Arc<RbdCompletions>,
    in_flight: usize,
}

impl RbdQueue {
    pub fn new(image: Arc<RbdImage>) -> io::Result<Self> {
        Ok(RbdQueue {
            image,
            completions: Arc::new(RbdCompletions {
                done: Mutex::new(Vec::new()),
                eventfd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            }),
            in_flight: 0,
        })
    }

    /// # Safety
    /// As [`crate::storage::QueueStorage::submit`].
    pub unsafe fn submit(&mut self, tag: u64, op: IoOp<'_>) -> Submitted {
        // SAFETY: forwarded from the caller.
        let r = unsafe { self.image.submit(&self.completions, tag, op) };
        if r == Submitted::Queued {
            self.in_flight += 1;
        }
        r
    }

    /// Waits until `wait` completions are there (or nothing is in flight).
    pub fn wait(&mut self, wait: usize) -> io::Result<()> {
        loop {
            let have = self
                .completions
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len();
            if have >= wait.min(self.in_flight) {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.completions.eventfd),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            // SAFETY: one valid pollfd and timeout; no signal mask change.
            let rc = unsafe { libc::ppoll(&mut pfd, 1, &timeout, std::ptr::null()) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let _ = self.completions.eventfd.read();
        }
    }

    pub fn reap(&mut self, mut f: impl FnMut(u64, i64)) {
        let done = std::mem::take(
            &mut *self
                .completions
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        self.in_flight -= done.len();
        for (tag, res) in done {
            f(tag, res);
        }
    }

    pub fn has_completions(&self) -> bool {
        !self
            .completions
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn completion_fd(&self) -> &EventFd {
        &self.completions.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            RbdSpec::parse("rbd/disk0").unwrap(),
            RbdSpec {
                pool: "rbd".into(),
                namespace: None,
                image: "disk0".into(),
                snapshot: None,
            }
        );
        let s = RbdSpec::parse("rbd/disk0@monday").unwrap();
        assert_eq!(s.snapshot.as_deref(), Some("monday"));
        assert_eq!(s.to_string(), "rbd:rbd/disk0@monday");
        assert!(RbdSpec::parse("rbd/disk0@").is_err());
        assert!(RbdSpec::parse("rbd/disk0@a/b").is_err());
        let s = RbdSpec::parse("vms/tenant1/disk0").unwrap();
        assert_eq!(s.namespace.as_deref(), Some("tenant1"));
        assert_eq!(s.to_string(), "rbd:vms/tenant1/disk0");
        for bad in ["", "rbd", "rbd/", "/x", "a/b/c/d", "a//b"] {
            assert!(RbdSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
