//! `vmcrypt top --control PATH`: a live view of a served disk, one row per
//! queue and a total, refreshed every second: IOPS and MB/s for reads and
//! writes, requests in flight, and read and write latency (p50, p99) over
//! the last interval.
//!
//! Each refresh is one `query-stats {"histograms": true}`; rates and
//! percentiles come from the difference with the previous one, so the
//! daemon keeps no state for its viewers.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{Client, ClientError};
use crate::metrics::{percentile_ns, BUCKETS, OP_NAMES};

/// Figures of one queue (or the total) at one instant.
#[derive(Clone, Default)]
struct Sample {
    ops: [u64; 2],
    bytes: [u64; 2],
    in_flight: u64,
    /// Read and write latency histograms, dense.
    hist: [Vec<u64>; 2],
}

impl Sample {
    fn from_json(q: &Value) -> Sample {
        let n = |k: &str| q[k].as_u64().unwrap_or(0);
        let hist = |op: &str| {
            let mut h = vec![0u64; BUCKETS];
            if let Some(pairs) = q["histograms"][op].as_array() {
                for p in pairs {
                    if let (Some(b), Some(c)) = (p[0].as_u64(), p[1].as_u64()) {
                        if let Some(slot) = h.get_mut(b as usize) {
                            *slot = c;
                        }
                    }
                }
            }
            h
        };
        Sample {
            ops: [n("read_ops"), n("write_ops")],
            bytes: [n("read_bytes"), n("write_bytes")],
            in_flight: n("in_flight"),
            hist: [hist(OP_NAMES[0]), hist(OP_NAMES[1])],
        }
    }
}

/// One refresh: (name, sample) per queue, then the total.
fn sample(client: &mut Client) -> Result<Vec<(String, Sample)>, ClientError> {
    let v = client.call("query-stats", json!({"histograms": true}))?;
    let mut rows: Vec<(String, Sample)> = v["queues"]
        .as_array()
        .map(|qs| {
            qs.iter()
                .map(|q| (q["queue"].to_string(), Sample::from_json(q)))
                .collect()
        })
        .unwrap_or_default();
    rows.push(("total".into(), Sample::from_json(&v["total"])));
    Ok(rows)
}

/// The table for the interval between `old` and `new`.
fn table(old: &[(String, Sample)], new: &[(String, Sample)], secs: f64) -> String {
    let mut out = format!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
        "queue",
        "read IOPS",
        "write IOPS",
        "read MB/s",
        "write MB/s",
        "in flight",
        "r p50 us",
        "r p99 us",
        "w p50 us",
        "w p99 us"
    );
    for ((name, n), (_, o)) in new.iter().zip(old) {
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let pct = |op: usize, p: f64| {
            let d: Vec<u64> = n.hist[op]
                .iter()
                .zip(&o.hist[op])
                .map(|(a, b)| a.saturating_sub(*b))
                .collect();
            percentile_ns(&d, p).map_or("-".into(), |ns| format!("{:.0}", ns as f64 / 1000.0))
        };
        out.push_str(&format!(
            "{:>6} {:>10.0} {:>10.0} {:>10.1} {:>10.1} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
            name,
            rate(n.ops[0], o.ops[0]),
            rate(n.ops[1], o.ops[1]),
            rate(n.bytes[0], o.bytes[0]) / 1e6,
            rate(n.bytes[1], o.bytes[1]) / 1e6,
            n.in_flight,
            pct(0, 0.5),
            pct(0, 0.99),
            pct(1, 0.5),
            pct(1, 0.99),
        ));
    }
    out
}

/// Runs the view until interrupted, or for `count` refreshes. On a
/// terminal each refresh redraws the screen; otherwise tables follow each
/// other, one per interval.
pub fn run(control: &Path, interval: Duration, count: Option<u64>) -> Result<(), ClientError> {
    let mut client = Client::connect(control)?;
    let status = client.call("status", json!({}))?;
    let title = format!(
        "vmcrypt top: {} ({}, {} queues) via {}",
        status["image"].as_str().unwrap_or("?"),
        status["format"].as_str().unwrap_or("?"),
        status["queues"],
        control.display()
    );
    let tty = std::io::stdout().is_terminal();
    let mut old = sample(&mut client)?;
    let mut at = Instant::now();
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        std::thread::sleep(interval);
        let new = sample(&mut client)?;
        let now = Instant::now();
        let secs = now.duration_since(at).as_secs_f64();
        let mut out = String::new();
        if tty {
            out.push_str("\x1b[H\x1b[2J");
        }
        out.push_str(&format!("{title}, every {:.1} s\n", interval.as_secs_f64()));
        out.push_str(&table(&old, &new, secs));
        if !tty {
            out.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (top | head) ends the view.
        if stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
        (old, at) = (new, now);
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_percentiles_come_from_the_interval() {
        let mut a = Sample {
            hist: [vec![0; BUCKETS], vec![0; BUCKETS]],
            ..Default::default()
        };
        // Before: many slow reads. In the interval: 100 fast ones.
        a.hist[0][200] = 1000;
        a.ops[0] = 1000;
        let mut b = a.clone();
        b.ops[0] += 100;
        b.bytes[0] += 100 * 4096;
        b.hist[0][10] += 100;
        let t = table(&[("0".into(), a)], &[("0".into(), b)], 2.0);
        let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[1], "50", "{t}");
        assert_eq!(row[3], "0.2", "{t}");
        let p50: f64 = row[6].parse().unwrap();
        assert!(p50 < 1.0, "the old slow reads leaked in: {t}");
        assert_eq!(row[8], "-", "no writes: {t}");
    }
}
