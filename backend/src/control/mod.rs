//! The control socket: JSON-RPC 2.0, one JSON object per line each way.
//!
//! `serve --control PATH` binds a unix socket beside the data socket (same
//! mode and group rules). Any number of clients may connect; each gets a
//! thread of its own, and a bad request gets an error without ending the
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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::filter::Throttle;
use crate::keys::KeyOrigin;
use crate::metrics::DiskMetrics;
pub use disk::Served;
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

/// Most clients served at once; more are told so and closed.
const MAX_CLIENTS: usize = 32;

/// Serves `listener` on a thread of its own, for the life of the process.
pub fn spawn(listener: UnixListener, control: Arc<Control>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, control))?;
    Ok(())
}

fn accept_loop(listener: UnixListener, control: Arc<Control>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn_limited!("control socket: accepting a client: {e}");
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let e = RpcError::server(format!("too many control clients (at most {MAX_CLIENTS})"));
            let _ = stream.write_all(rpc::error_line(Value::Null, &e).as_bytes());
            continue;
        }
        let (control, clients) = (control.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &control) {
                    tracing::debug!("control client: {e}");
                }
                clients.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            warn_limited!("control socket: no thread for a client: {e}");
        }
    }
}

/// Answers one client's requests, one line each, until it hangs up.
fn serve_client(stream: UnixStream, control: &Control) -> io::Result<()> {
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
            continue;
        } else {
            rpc::handle(&line, |method, params| call(control, method, params))
        };
        out.write_all(answer.as_bytes())?;
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

/// Runs `method`.
fn call(control: &Control, method: &str, params: &Value) -> Result<Value, RpcError> {
    match method {
        "status" => {
            rpc::no_params(params)?;
            Ok(status(control))
        }
        "query-stats" => {
            let histograms = match params {
                Value::Null => false,
                Value::Object(o) if o.is_empty() => false,
                Value::Object(o) if o.len() == 1 && o.contains_key("histograms") => {
                    o["histograms"].as_bool().ok_or_else(|| {
                        RpcError::invalid_params("histograms: expected true or false")
                    })?
                }
                _ => {
                    return Err(RpcError::invalid_params(
                        "query-stats takes no parameters but {\"histograms\": true}",
                    ))
                }
            };
            Ok(stats::query(&control.metrics, histograms))
        }
        "metrics" => {
            rpc::no_params(params)?;
            Ok(Value::String(prom::render(control)))
        }
        "set-throttle" => set_throttle(control, params),
        "resize" => disk::resize(&control.served, params),
        "snapshot" => disk::snapshot(&control.served, params),
        "notify-guest" => disk::notify_guest(&control.served),
        other => Err(RpcError::method_not_found(other)),
    }
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
