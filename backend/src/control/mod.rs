//! The control socket: JSON-RPC 2.0, one JSON object per line each way.
//!
//! `serve --control PATH` binds a unix socket beside the data socket, with
//! a mode of its own (`--control-mode`, 0600 by default): it is the admin
//! API, and QEMU, which may share the data socket's group, is no admin.
//! Each client's uid is checked against `--control-allow-uid` (the
//! daemon's own user and root by default). Up to 32 clients are served at
//! once, each on a thread of its own; a 33rd takes the slot of the client
//! idle the longest. A bad request gets an error without ending the
//! connection or the daemon. Nothing here touches the data path: the
//! methods read the queues' counters ([`crate::metrics`]) and change the
//! throttle's limits, whose queues see the change through their own flag.
//!
//! Methods: `status`, `query-stats`, `metrics` (Prometheus text),
//! `set-throttle`, and the ones that change the disk (`disk`): `resize`
//! and `snapshot`.

pub mod client;
mod disk;
pub mod http;
mod prom;
mod rpc;
mod stats;
pub mod top;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::filter::Throttle;
use crate::keys::KeyOrigin;
use crate::metrics::DiskMetrics;
pub use disk::{Served, SnapshotDir};
pub use rpc::{RpcError, MAX_REQUEST};

/// What `status` reports that does not change while serving.
#[derive(Clone, Debug)]
pub struct StatusInfo {
    pub image: String,
    /// `raw` or `luks1`.
    pub format: &'static str,
    pub block_size: u32,
    pub queues: usize,
    pub read_only: bool,
    pub cache: &'static str,
    pub filters: Vec<String>,
    pub key: Option<KeyOrigin>,
}

/// What the control methods work on.
pub struct Control {
    pub info: StatusInfo,
    pub metrics: Arc<DiskMetrics>,
    /// The pipeline's throttle (configured, or put there with no limits).
    pub throttle: Arc<Throttle>,
    /// Whether a frontend is connected now.
    pub connected: Arc<AtomicBool>,
    pub started: Instant,
    /// The disk, for the methods that change it.
    pub served: Served,
}

/// Most clients served at once. When all slots are taken, a new client
/// takes the slot of the one idle the longest, so idle or stuck clients
/// never lock the operator out.
const MAX_CLIENTS: usize = 32;

/// How long an answer may wait for a client that does not read it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` on a thread of its own, for the life of the process.
/// Only the users in `allowed` (uids, checked with `SO_PEERCRED`) are
/// served; others get an error line and are closed.
pub fn spawn(listener: UnixListener, control: Arc<Control>, allowed: Vec<u32>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, control, &allowed))?;
    Ok(())
}

/// One connected client, as the accept loop sees it.
struct Slot {
    id: u64,
    /// A second handle on the client's socket, to shut it when evicted.
    stream: UnixStream,
    /// Whether a method is running for it (never evicted then).
    busy: Arc<AtomicBool>,
    /// When it last sent a request, in ms since `epoch`.
    last: Arc<AtomicU64>,
}

/// The connected clients; each thread removes its own slot when it ends.
#[derive(Default)]
struct Slots(Mutex<Vec<Slot>>);

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more client: true if there is a slot, evicting
    /// the client idle the longest if all are taken.
    fn make_room(&self) -> bool {
        let mut slots = self.lock();
        if slots.len() < MAX_CLIENTS {
            return true;
        }
        let idle = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy.load(Ordering::Acquire))
            .min_by_key(|(_, s)| s.last.load(Ordering::Relaxed))
            .map(|(i, _)| i);
        match idle {
            Some(i) => {
                let evicted = slots.swap_remove(i);
                let _ = evicted.stream.shutdown(std::net::Shutdown::Both);
                tracing::info!("control socket: all {MAX_CLIENTS} slots taken; closed the client idle the longest");
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|s| s.id != id);
    }
}

/// Gives the slot back however the client's thread ends (or if it never
/// starts).
struct SlotGuard<'a> {
    slots: &'a Slots,
    id: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.slots.remove(self.id);
    }
}

fn accept_loop(listener: UnixListener, control: Arc<Control>, allowed: &[u32]) {
    let slots: &'static Slots = Box::leak(Box::default());
    let epoch = Instant::now();
    for (id, stream) in (0u64..).zip(listener.incoming()) {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn_limited!("control socket: accepting a client: {e}");
                continue;
            }
        };
        // Nothing the client does may hold this thread: answers that wait
        // for a reader give up.
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let refuse = |stream: &mut UnixStream, e: RpcError| {
            let _ = stream.write_all(rpc::error_line(Value::Null, &e).as_bytes());
        };
        match crate::listen::peer_credentials(&stream) {
            Ok(cred) if allowed.contains(&cred.uid) => {}
            Ok(cred) => {
                warn_limited!(
                    uid = cred.uid,
                    pid = cred.pid,
                    "control socket: refused a client whose user is not allowed (--control-allow-uid)"
                );
                refuse(
                    &mut stream,
                    RpcError::server(format!(
                        "uid {} is not allowed on this control socket (--control-allow-uid)",
                        cred.uid
                    )),
                );
                continue;
            }
            Err(e) => {
                warn_limited!("control socket: cannot read a client's credentials: {e}");
                continue;
            }
        }
        if !slots.make_room() {
            let e = RpcError::server(format!(
                "too many control clients (at most {MAX_CLIENTS}, all busy)"
            ));
            refuse(&mut stream, e);
            continue;
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let busy = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
        slots.lock().push(Slot {
            id,
            stream: handle,
            busy: busy.clone(),
            last: last.clone(),
        });
        let guard = SlotGuard { slots, id };
        let control = control.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _guard = guard;
                let activity = Activity { busy, last, epoch };
                if let Err(e) = serve_client(stream, &control, &activity) {
                    tracing::debug!("control client: {e}");
                }
            });
        // A thread that could not start dropped its guard: the slot is free.
        if let Err(e) = spawned {
            warn_limited!("control socket: no thread for a client: {e}");
        }
    }
}

/// What a client's thread tells the accept loop about it.
struct Activity {
    busy: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

/// Answers one client's requests, one line each, until it hangs up.
fn serve_client(stream: UnixStream, control: &Control, activity: &Activity) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        activity.busy.store(true, Ordering::Release);
        activity.last.store(
            activity.epoch.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
        let answer = if line.len() > MAX_REQUEST {
            // Skip the rest of the oversized line, then answer it.
            if !line.ends_with(b"\n") {
                skip_line(&mut reader)?;
            }
            rpc::error_line(
                Value::Null,
                &RpcError::invalid_request(format!("request longer than {MAX_REQUEST} bytes")),
            )
        } else if line.iter().all(u8::is_ascii_whitespace) {
            activity.busy.store(false, Ordering::Release);
            continue;
        } else {
            rpc::handle(&line, |method, params| call(control, method, params))
        };
        let written = out.write_all(answer.as_bytes());
        activity.busy.store(false, Ordering::Release);
        written?;
    }
}

fn skip_line(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// A control method: its name and what runs it.
type Method = fn(&Control, &Value) -> Result<Value, RpcError>;

/// Every method the control socket answers, in the order `--help` and the
/// error for an unknown method list them.
const METHODS: &[(&str, Method)] = &[
    ("status", |c, p| {
        rpc::no_params(p)?;
        Ok(status(c))
    }),
    ("query-stats", query_stats),
    ("metrics", |c, p| {
        rpc::no_params(p)?;
        Ok(Value::String(prom::render(c)))
    }),
    ("set-throttle", set_throttle),
    ("resize", |c, p| disk::resize(&c.served, p)),
    ("snapshot", |c, p| disk::snapshot(&c.served, p)),
    ("notify-guest", |c, _| disk::notify_guest(&c.served)),
];

/// The names of every method, for messages.
pub fn method_names() -> Vec<&'static str> {
    METHODS.iter().map(|(name, _)| *name).collect()
}

/// Runs `method`.
fn call(control: &Control, method: &str, params: &Value) -> Result<Value, RpcError> {
    match METHODS.iter().find(|(name, _)| *name == method) {
        Some((_, run)) => run(control, params),
        None => Err(RpcError::method_not_found(method, &method_names())),
    }
}

fn query_stats(control: &Control, params: &Value) -> Result<Value, RpcError> {
    let histograms = match params {
        Value::Null => false,
        Value::Object(o) if o.is_empty() => false,
        Value::Object(o) if o.len() == 1 && o.contains_key("histograms") => o["histograms"]
            .as_bool()
            .ok_or_else(|| RpcError::invalid_params("histograms: expected true or false"))?,
        _ => {
            return Err(RpcError::invalid_params(
                "query-stats takes no parameters but {\"histograms\": true}",
            ))
        }
    };
    Ok(stats::query(&control.metrics, histograms))
}

fn status(c: &Control) -> Value {
    let i = &c.info;
    let (running, logging) = c
        .served
        .device
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or((false, false), |d| (d.is_running(), d.dirty_logging()));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "image": i.image,
        "format": i.format,
        "capacity": c.served.disk.capacity.get(),
        "block_size": i.block_size,
        "queues": i.queues,
        "read_only": i.read_only,
        "cache": i.cache,
        "filters": i.filters,
        "frontend_connected": c.connected.load(Ordering::Relaxed),
        "device_running": running,
        "dirty_logging": logging,
        "key_provider": i.key.as_ref().map(|k| k.provider.clone()),
        "key_id": i.key.as_ref().and_then(|k| k.key_id.clone()),
        "throttle": limits(&c.throttle),
        "uptime_s": c.started.elapsed().as_secs_f64(),
    })
}

fn limits(t: &Throttle) -> Value {
    Value::Object(
        t.limits()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect(),
    )
}

/// `set-throttle {name: value, ...}`: changes the named limits.
fn set_throttle(c: &Control, params: &Value) -> Result<Value, RpcError> {
    let obj = params.as_object().ok_or_else(|| {
        RpcError::invalid_params("expected an object of limits, e.g. {\"total_iops_sec\": 1000}")
    })?;
    let mut changes = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        let n = v.as_u64().ok_or_else(|| {
            RpcError::invalid_params(format!("{k}: expected a whole number >= 0, got {v}"))
        })?;
        changes.push((k.clone(), n));
    }
    c.throttle
        .update(&changes)
        .map_err(|e| RpcError::invalid_params(e.to_string()))?;
    tracing::info!(limits = ?c.throttle.limits(), "throttle limits changed");
    Ok(json!({ "throttle": limits(&c.throttle) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error for an unknown method lists every method there is, from
    /// the table itself.
    #[test]
    fn an_unknown_method_lists_every_method() {
        let e = RpcError::method_not_found("nope", &method_names());
        for m in [
            "status",
            "query-stats",
            "metrics",
            "set-throttle",
            "resize",
            "snapshot",
            "notify-guest",
        ] {
            assert!(e.message.contains(m), "{m} missing: {}", e.message);
        }
    }
}
