//! A minimal QMP client (QEMU's JSON control protocol over a unix socket),
//! enough to migrate a guest and watch the migration.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (waiting up to 30 s for QEMU to create the socket) and
    /// leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
            writer: stream,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if line.is_empty() {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP JSON: {e}: {line}"))
    }

    /// Runs `command` and returns its `return` value; events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{command}: {e}"));
            }
        }
    }
}

/// What `query-migrate` reported at the end of a migration.
#[derive(Clone, Debug)]
pub struct Migration {
    /// Milliseconds from start to completion.
    pub total_ms: u64,
    /// Milliseconds the guest was stopped.
    pub downtime_ms: u64,
}

/// Migrates the guest behind `qmp` to `uri` and waits for completion.
pub fn migrate(qmp: &mut Qmp, uri: &str, timeout: Duration) -> Result<Migration, String> {
    qmp.execute("migrate", json!({ "uri": uri }))?;
    let deadline = Instant::now() + timeout;
    loop {
        let st = qmp.execute("query-migrate", json!({}))?;
        match st["status"].as_str().unwrap_or("") {
            "completed" => {
                return Ok(Migration {
                    total_ms: st["total-time"].as_u64().unwrap_or(0),
                    downtime_ms: st["downtime"].as_u64().unwrap_or(0),
                })
            }
            "failed" | "cancelled" => return Err(format!("migration {st}")),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("migration not done within {timeout:?}: {st}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
