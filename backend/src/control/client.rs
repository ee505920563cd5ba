//! The control socket's client side, for `vmcrypt ctl` and `vmcrypt top`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

/// Errors talking to the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: the daemon closed the connection without answering")]
    NoAnswer { path: PathBuf },
    #[error("control socket {path}: answer is not JSON-RPC: {reason}")]
    BadAnswer { path: PathBuf, reason: String },
    #[error("{method}: {message} (code {code})")]
    Rpc {
        method: String,
        code: i64,
        message: String,
    },
    #[error("parameter '{0}' is not key=value")]
    Param(String),
}

/// A connection to a daemon's control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.into(),
            source,
        })?;
        let io = |source| ClientError::Io {
            path: path.into(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        Ok(Client {
            path: path.into(),
            reader: BufReader::new(stream.try_clone().map_err(io)?),
            writer: stream,
            next_id: 1,
        })
    }

    /// Calls `method` and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line =
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        line.push('\n');
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        // A daemon that refuses this client says why and closes at once:
        // its answer may be there although the request could not be sent.
        let sent = self.writer.write_all(line.as_bytes());
        let mut answer = String::new();
        match (sent, self.reader.read_line(&mut answer)) {
            (_, Ok(n)) if n > 0 => {}
            (Err(e), _) | (Ok(()), Err(e)) => return Err(io(e)),
            (Ok(()), Ok(_)) => {
                return Err(ClientError::NoAnswer {
                    path: self.path.clone(),
                })
            }
        }
        let bad = |reason: String| ClientError::BadAnswer {
            path: self.path.clone(),
            reason,
        };
        let v: Value = serde_json::from_str(&answer).map_err(|e| bad(e.to_string()))?;
        if let Some(e) = v.get("error") {
            return Err(ClientError::Rpc {
                method: method.into(),
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or("").into(),
            });
        }
        v.get("result")
            .cloned()
            .ok_or_else(|| bad("no result".into()))
    }
}

/// `key=value` words as a params object. A value is a number where it
/// reads as one (sizes with K/M/G/T too), else JSON (true, null, ...),
/// else a string.
pub fn params(words: &[String]) -> Result<Value, ClientError> {
    let mut m = Map::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| ClientError::Param(w.clone()))?;
        let value = match crate::config::parse_size(v) {
            Ok(n) => Value::from(n),
            Err(_) => serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into())),
        };
        m.insert(k.into(), value);
    }
    Ok(Value::Object(m))
}

/// A result for people: `metrics` as the text it is, `query-stats` as a
/// table, objects as `key: value` lines.
pub fn readable(method: &str, result: &Value) -> String {
    match (method, result) {
        (_, Value::String(s)) => s.clone(),
        ("query-stats", v) => stats_table(v),
        (_, Value::Object(o)) => {
            let mut out = String::new();
            for (k, v) in o {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                out.push_str(&format!("{k}: {v}\n"));
            }
            out
        }
        (_, v) => format!("{v:#}\n"),
    }
}

/// `query-stats` as one row per queue and a total.
pub fn stats_table(v: &Value) -> String {
    let mut out = format!(
        "{:>6} {:>12} {:>12} {:>8} {:>9} {:>12} {:>12} {:>7} {:>9} {:>9} {:>9}\n",
        "queue",
        "reads",
        "writes",
        "flushes",
        "discards",
        "read MiB",
        "write MiB",
        "errors",
        "in flight",
        "r p99 us",
        "w p99 us"
    );
    let row = |name: String, q: &Value| {
        let n = |k: &str| q[k].as_u64().unwrap_or(0);
        let p99 = |op: &str| {
            q["latency_us"][op]["p99"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}"))
        };
        format!(
            "{:>6} {:>12} {:>12} {:>8} {:>9} {:>12.1} {:>12.1} {:>7} {:>9} {:>9} {:>9}\n",
            name,
            n("read_ops"),
            n("write_ops"),
            n("flush_ops"),
            n("discard_ops") + n("write_zeroes_ops"),
            n("read_bytes") as f64 / (1 << 20) as f64,
            n("write_bytes") as f64 / (1 << 20) as f64,
            n("errors"),
            n("in_flight"),
            p99("read"),
            p99("write"),
        )
    };
    if let Some(qs) = v["queues"].as_array() {
        for q in qs {
            out.push_str(&row(q["queue"].to_string(), q));
        }
    }
    out.push_str(&row("total".into(), &v["total"]));
    out
}
