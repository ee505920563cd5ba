//! `serve --metrics-listen ADDR:PORT`: the `metrics` text over plain HTTP,
//! for Prometheus to scrape (`GET /metrics`).
//!
//! One thread answers one connection at a time: a scrape every few seconds
//! is the whole load. Each connection has a deadline for its whole request
//! (not per read: a client trickling a byte at a time gets no longer) and
//! is closed after its answer, so a client that stalls holds the next
//! scrape back by at most that long. Only `GET` (and `HEAD`) of `/metrics` and `/` are
//! answered; nothing can be changed from here.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{prom, Control};

/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send its whole request, and to take the
/// answer.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Serves `listener` on a thread of its own, for the life of the process.
pub fn spawn(listener: TcpListener, control: Arc<Control>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &control) {
                            tracing::debug!("metrics HTTP client: {e}");
                        }
                    }
                    Err(e) => warn_limited!("metrics HTTP: accepting a client: {e}"),
                }
            }
        })?;
    Ok(())
}

fn answer(mut s: TcpStream, control: &Control) -> io::Result<()> {
    s.set_write_timeout(Some(TIMEOUT))?;
    let head = read_head(&mut s, Instant::now() + TIMEOUT)?;
    let (status, body, content_type, head_only) = route(&head, control);
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    s.write_all(&out)
}

/// The request line's answer: (status, body, content type, HEAD).
fn route(head: &str, control: &Control) -> (&'static str, String, &'static str, bool) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return ("405 Method Not Allowed", "only GET\n".into(), TEXT, false);
    }
    match path {
        "/metrics" => (
            "200 OK",
            prom::render(control),
            "text/plain; version=0.0.4; charset=utf-8",
            head_only,
        ),
        "/" => (
            "200 OK",
            "vmcrypt: the counters are at /metrics\n".into(),
            TEXT,
            head_only,
        ),
        _ => (
            "404 Not Found",
            "not found; try /metrics\n".into(),
            TEXT,
            head_only,
        ),
    }
}

/// Reads up to the blank line that ends the request head, by `deadline`.
fn read_head(s: &mut TcpStream, deadline: Instant) -> io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete in time",
            ));
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
