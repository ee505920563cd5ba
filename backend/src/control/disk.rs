//! Control methods that change the served disk: `resize` and `snapshot`.
//!
//! Both hold the device's queues still for a moment ([`BlockDevice::pause`]):
//! no request is taken and none is in flight while the image changes
//! under the guest. A resize grows the image first, while the guest runs
//! (it cannot reach the new space yet), then holds the queues only to tell
//! each the new capacity, then tells the frontend (which tells the guest). A snapshot syncs
//! the image (once before the pause for the bulk of the dirty data, once
//! inside it for the rest) and clones its file with a reflink, which takes
//! milliseconds whatever the size; a file system without reflinks is refused rather
//! than holding the guest for a full copy.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::rpc::RpcError;
use crate::device::BlockDevice;
use crate::keys::KeyDescriptor;
use crate::storage::Image;
use crate::worker::DiskInfo;

/// What the disk methods work on.
pub struct Served {
    pub image: Arc<Image>,
    pub disk: Arc<DiskInfo>,
    /// The device of this connection (or the one waiting for a frontend).
    /// Held for the whole of a method, so that a new connection's queues
    /// never miss a change.
    pub device: Arc<Mutex<Option<BlockDevice>>>,
    /// The encrypted image's key descriptor, copied beside a snapshot.
    pub descriptor: Option<KeyDescriptor>,
    pub read_only: bool,
    /// The one folder snapshots are created in (file images only).
    pub snapshot_dir: Option<SnapshotDir>,
}

/// The folder snapshots are made in (`--snapshot-dir`, else the image's):
/// held open from the start, and every file made relative to it with
/// `openat`, so a snapshot can land nowhere else, whatever name a client
/// sends and whatever the folder's path points to later.
#[derive(Debug)]
pub struct SnapshotDir(crate::sys::HeldDir);

impl SnapshotDir {
    pub fn open(path: &Path) -> io::Result<SnapshotDir> {
        crate::sys::HeldDir::open(path).map(SnapshotDir)
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.fd()
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The file name a request names: `{"name": "NAME"}`, or
    /// `{"path": "/abs/DIR/NAME"}` whose folder is this one.
    fn name_in(&self, params: &Value) -> Result<String, RpcError> {
        let obj = params.as_object();
        let field = |k: &str| obj.and_then(|o| o.get(k)).and_then(Value::as_str);
        let usage = || {
            RpcError::invalid_params(format!(
                "expected {{\"name\": \"NEW-FILE\"}} (created in {})",
                self.path().display()
            ))
        };
        if let Some(name) = field("name") {
            check_name(name)?;
            return Ok(name.into());
        }
        let path = PathBuf::from(field("path").ok_or_else(usage)?);
        if !path.is_absolute() {
            return Err(RpcError::invalid_params(format!(
                "path {}: must be absolute (the daemon's working directory is not the client's); \
                 or give {{\"name\": \"NEW-FILE\"}}",
                path.display()
            )));
        }
        let outside = || {
            RpcError::invalid_params(format!(
                "path {}: snapshots are created in {} only (--snapshot-dir)",
                path.display(),
                self.path().display()
            ))
        };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(outside());
        };
        let name = name.to_str().ok_or_else(outside)?;
        check_name(name)?;
        if self.0.is(parent) {
            Ok(name.into())
        } else {
            Err(outside())
        }
    }
}

/// A snapshot's name: one path component, no hidden or special names.
fn check_name(name: &str) -> Result<(), RpcError> {
    let bad = |why: &str| {
        Err(RpcError::invalid_params(format!(
            "snapshot name '{name}': {why}"
        )))
    };
    if name.is_empty() || name.len() > 255 {
        return bad("must be 1 to 255 bytes");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("must be one file name, without '/'");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if name.ends_with(crate::keys::DESCRIPTOR_SUFFIX) {
        return bad("that ending is the key descriptor's");
    }
    Ok(())
}

/// `notify-guest`: interrupts the guest on every running queue, as the
/// daemon does when a ring starts. For a guest suspected of having missed
/// a completion's interrupt: its driver looks at the used rings again.
pub fn notify_guest(s: &Served) -> Result<Value, RpcError> {
    let current = lock(&s.device);
    let n = match current.as_ref() {
        Some(d) => d
            .signal_guest()
            .map_err(|e| RpcError::server(format!("signalling the guest: {e}")))?,
        None => 0,
    };
    tracing::info!(queues = n, "control: guest notified");
    Ok(json!({ "queues": n }))
}

/// `resize {size}`: grows the disk to `size` bytes (a number, or a string
/// such as "8G"); the guest is told through the frontend.
pub fn resize(s: &Served, params: &Value) -> Result<Value, RpcError> {
    let size = size_param(params)?;
    if s.read_only {
        return Err(RpcError::invalid_params("the disk is served read-only"));
    }
    let block = u64::from(s.disk.limits.block_size);
    // Past this, offsets no longer fit the sector arithmetic of virtio-blk
    // and of the storages (signed 64-bit file offsets).
    const LARGEST: u64 = 1 << 62;
    if size > LARGEST {
        return Err(RpcError::invalid_params(format!(
            "size {size}: larger than the {LARGEST} bytes a disk may have"
        )));
    }
    if size == 0 || !size.is_multiple_of(block) {
        return Err(RpcError::invalid_params(format!(
            "size {size}: must be a positive multiple of the block size ({block} bytes)"
        )));
    }
    let current = lock(&s.device);
    let old = s.disk.capacity.get();
    if size < old {
        return Err(RpcError::invalid_params(format!(
            "size {size} is smaller than the disk ({old} bytes): shrinking is refused, it would \
             cut off the guest's data"
        )));
    }
    if size == old {
        return Ok(json!({ "capacity": old, "previous": old, "frontend_notified": false }));
    }
    // The image grows (and the new size is made durable, with whatever the
    // guest wrote before) while the guest runs: it cannot reach the new
    // space before its queues learn the capacity, inside the pause.
    s.image
        .grow(size)
        .map_err(|e| RpcError::server(format!("growing the image to {size} bytes: {e}")))?;
    let t = Instant::now();
    {
        let mut paused = current
            .as_ref()
            .map(|d| d.pause())
            .transpose()
            .map_err(|e| RpcError::server(format!("pausing the queues: {e}")))?;
        s.disk.capacity.set(size);
        if let Some(p) = paused.as_mut() {
            p.set_capacity(size);
        }
    }
    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
    let device = current.clone();
    drop(current);
    // After the queues resume: the frontend reads the config space back
    // while this waits for its answer.
    let notified = match device.map(|d| d.config_changed()).transpose() {
        Ok(n) => n.unwrap_or(false),
        Err(e) => {
            tracing::warn!("telling the frontend about the new capacity: {e}");
            false
        }
    };
    tracing::info!(
        capacity = size,
        previous = old,
        notified,
        pause_ms,
        "disk resized"
    );
    Ok(json!({
        "capacity": size,
        "previous": old,
        "frontend_notified": notified,
        "pause_ms": pause_ms,
    }))
}

fn size_param(params: &Value) -> Result<u64, RpcError> {
    let v = params
        .as_object()
        .and_then(|o| o.get("size"))
        .ok_or_else(|| RpcError::invalid_params("expected {\"size\": bytes or \"8G\"}"))?;
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| RpcError::invalid_params(format!("size: {n} is not a whole number"))),
        Value::String(t) => {
            crate::config::parse_size(t).map_err(|e| RpcError::invalid_params(format!("size: {e}")))
        }
        other => Err(RpcError::invalid_params(format!(
            "size: expected a number of bytes or a string such as \"8G\", got {other}"
        ))),
    }
}

/// Most syncs before the pause, and the time under which one is short
/// enough to stop.
const PRESYNC_ROUNDS: usize = 4;
const PRESYNC_SHORT: std::time::Duration = std::time::Duration::from_millis(10);

/// `snapshot {name}`: a point-in-time copy of the disk as the new file
/// NAME in the snapshot folder, taken with a reflink while the queues are
/// held. `{path}` is accepted too when its folder is the snapshot folder.
pub fn snapshot(s: &Served, params: &Value) -> Result<Value, RpcError> {
    if let Image::Rbd { rbd, .. } = &*s.image {
        return snapshot_rbd(s, rbd, params);
    }
    if matches!(*s.image, Image::Null { .. }) {
        return Err(RpcError::invalid_params(
            "a null device has no data to snapshot",
        ));
    }
    let dir = s.snapshot_dir.as_ref().ok_or_else(|| {
        RpcError::server("snapshots are not enabled for this disk (no snapshot folder)")
    })?;
    let name = dir.name_in(params)?;
    let path = dir.path().join(&name);
    // Both files are made before the guest is held: a name that exists
    // fails here, and nothing is ever overwritten.
    let mut made = Made::new(dir);
    let file = made.create(&name)?;
    let descriptor = match &s.descriptor {
        Some(d) => {
            let n = format!("{name}{}", crate::keys::DESCRIPTOR_SUFFIX);
            let p = dir.path().join(&n);
            Some((made.create(&n)?, p, d))
        }
        None => None,
    };

    // What the guest wrote goes to disk before the queues are held, in
    // rounds (as a migration copies memory): each round has only what was
    // written during the last, and the sync inside the pause only what
    // came during the shortest.
    let t = Instant::now();
    for _ in 0..PRESYNC_ROUNDS {
        let round = Instant::now();
        s.image
            .sync()
            .map_err(|e| RpcError::server(format!("flushing the image: {e}")))?;
        if round.elapsed() < PRESYNC_SHORT {
            break;
        }
    }
    let presync_ms = t.elapsed().as_secs_f64() * 1e3;

    let current = lock(&s.device);
    let t = Instant::now();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let (cloned, drain_ms, sync_ms, clone_ms) = {
        let _paused = current
            .as_ref()
            .map(|d| d.pause())
            .transpose()
            .map_err(|e| RpcError::server(format!("pausing the queues: {e}")))?;
        let drain_ms = ms(t);
        let t = Instant::now();
        s.image
            .sync()
            .map_err(|e| RpcError::server(format!("flushing the image: {e}")))?;
        let sync_ms = ms(t);
        let t = Instant::now();
        (s.image.reflink_to(&file), drain_ms, sync_ms, ms(t))
    };
    let pause_ms = ms(t);
    drop(current);
    if let Err(e) = cloned {
        return Err(RpcError::server(no_reflink_reason(&path, &e)));
    }

    let io_err = |what: &str, p: &Path, e: io::Error| {
        RpcError::server(format!("{what} {}: {e}", p.display()))
    };
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    file.sync_all()
        .map_err(|e| io_err("syncing the snapshot", &path, e))?;
    let descriptor_path = match descriptor {
        Some((mut f, p, d)) => {
            f.write_all(d.text().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err("writing the key descriptor", &p, e))?;
            Some(p)
        }
        None => None,
    };
    // The new names are durable once their folder is synced.
    // SAFETY: fsync on a valid, open descriptor.
    if unsafe { libc::fsync(dir.fd()) } != 0 {
        return Err(io_err(
            "syncing the folder",
            dir.path(),
            io::Error::last_os_error(),
        ));
    }
    made.keep();
    tracing::info!(
        path = %path.display(),
        pause_ms,
        drain_ms,
        sync_ms,
        reflink_ms = clone_ms,
        presync_ms,
        bytes,
        "snapshot taken"
    );
    Ok(json!({
        "path": path.display().to_string(),
        "key_descriptor": descriptor_path.map(|p| p.display().to_string()),
        "bytes": bytes,
        "pause_ms": pause_ms,
        "presync_ms": presync_ms,
        "pause_detail_ms": {"drain": drain_ms, "sync": sync_ms, "reflink": clone_ms},
    }))
}

/// `snapshot {name}` of an RBD image: an RBD snapshot `IMAGE@name`, taken
/// while the queues are held (after a flush, so it holds every completed
/// write). It serves on its own, read-only: `--image rbd:POOL/IMAGE@name
/// --read-only`; an encrypted image's snapshot opens with the same key.
fn snapshot_rbd(s: &Served, rbd: &crate::rbd::RbdImage, params: &Value) -> Result<Value, RpcError> {
    let name = params
        .as_object()
        .and_then(|o| o.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            RpcError::invalid_params(
                "an RBD image takes {\"name\": \"SNAPSHOT\"} (an RBD snapshot), not a path",
            )
        })?;
    if !crate::rbd::is_name(name) {
        return Err(RpcError::invalid_params(format!(
            "snapshot name '{name}': use letters, digits, '-', '_' and '.'"
        )));
    }
    let current = lock(&s.device);
    let t = Instant::now();
    let taken = {
        let _paused = current
            .as_ref()
            .map(|d| d.pause())
            .transpose()
            .map_err(|e| RpcError::server(format!("pausing the queues: {e}")))?;
        rbd.flush().and_then(|()| rbd.snapshot(name))
    };
    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(current);
    let mut spec = rbd.spec().clone();
    spec.snapshot = Some(name.into());
    taken.map_err(|e| {
        RpcError::server(match e.raw_os_error() {
            Some(libc::EEXIST) => format!("{spec}: a snapshot of that name exists"),
            _ => format!("{spec}: {e}"),
        })
    })?;
    tracing::info!(snapshot = %spec, pause_ms, "RBD snapshot taken");
    Ok(json!({ "snapshot": spec.to_string(), "pause_ms": pause_ms }))
}

/// Why a reflink failed, in the operator's terms.
fn no_reflink_reason(path: &Path, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => format!(
            "snapshot {}: the file system has no reflinks ({e}); snapshots need the image on \
             XFS (mkfs.xfs -m reflink=1) or btrfs, and are never a full copy that would hold \
             the guest",
            path.display()
        ),
        Some(libc::EXDEV) => format!(
            "snapshot {}: not on the image's file system ({e}); a reflink cannot cross file systems",
            path.display()
        ),
        _ => format!("snapshot {}: cloning the image: {e}", path.display()),
    }
}

/// Files a method created in the snapshot folder, removed again unless it
/// succeeds.
struct Made<'a> {
    dir: &'a SnapshotDir,
    names: Vec<std::ffi::CString>,
}

impl<'a> Made<'a> {
    fn new(dir: &'a SnapshotDir) -> Self {
        Made {
            dir,
            names: Vec::new(),
        }
    }

    /// Creates `name` in the folder; it must not exist, and a symlink
    /// there is not followed (0600: it holds the disk).
    fn create(&mut self, name: &str) -> Result<File, RpcError> {
        let display = self.dir.path().join(name);
        let c = std::ffi::CString::new(name)
            .map_err(|_| RpcError::invalid_params("a name holds a NUL byte"))?;
        let file = self.dir.0.create_new(&c, 0o600).map_err(|e| {
            RpcError::invalid_params(match e.kind() {
                io::ErrorKind::AlreadyExists => format!(
                    "{}: already exists; a snapshot never overwrites",
                    display.display()
                ),
                _ => format!("cannot create {}: {e}", display.display()),
            })
        })?;
        self.names.push(c);
        Ok(file)
    }

    fn keep(&mut self) {
        self.names.clear();
    }
}

impl Drop for Made<'_> {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.dir.0.remove(n);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
