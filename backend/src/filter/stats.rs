//! `stats`: counts, bytes and a latency histogram per operation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::{check_keys, Filter, FilterError, FilterSpec, QueueFilter, Verdict};
use crate::metrics::op_index;
use crate::request::{Request, Status};

/// Latency buckets: bucket i counts requests that took < 2^i microseconds
/// (the last one everything slower).
const BUCKETS: usize = 24;
/// Log names, by [`op_index`].
const OPS: [&str; 6] = [
    "read",
    "write",
    "flush",
    "discard",
    "write-zeroes",
    "get-id",
];

#[derive(Default)]
struct OpStats {
    count: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    total_us: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

/// Counters of one queue: written by that queue's worker only (relaxed
/// atomics, so reading them for a report needs no lock).
#[derive(Default)]
struct QueueStats {
    ops: [OpStats; 6],
}

/// The configured `stats` filter.
pub struct Stats {
    queues: Vec<Arc<QueueStats>>,
}

impl Stats {
    pub fn new(spec: &FilterSpec, num_queues: usize) -> Result<Self, FilterError> {
        check_keys(spec, &[])?;
        Ok(Stats {
            queues: (0..num_queues.max(1)).map(|_| Arc::default()).collect(),
        })
    }

    /// Totals over all queues for one operation: (count, errors, bytes, total_us, histogram).
    fn totals(&self, op: usize) -> (u64, u64, u64, u64, [u64; BUCKETS]) {
        let mut t = (0, 0, 0, 0, [0u64; BUCKETS]);
        for q in &self.queues {
            let s = &q.ops[op];
            t.0 += s.count.load(Relaxed);
            t.1 += s.errors.load(Relaxed);
            t.2 += s.bytes.load(Relaxed);
            t.3 += s.total_us.load(Relaxed);
            for (acc, b) in t.4.iter_mut().zip(&s.hist) {
                *acc += b.load(Relaxed);
            }
        }
        t
    }
}

/// The latency below which `pct` percent of requests completed (upper bucket bound).
fn percentile_us(hist: &[u64; BUCKETS], count: u64, pct: u64) -> u64 {
    let want = (count * pct).div_ceil(100);
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want {
            return 1 << i;
        }
    }
    1 << (BUCKETS - 1)
}

impl Filter for Stats {
    fn name(&self) -> &'static str {
        "stats"
    }

    fn queue_filter(&self, queue: usize) -> Box<dyn QueueFilter> {
        let stats = self.queues[queue % self.queues.len()].clone();
        Box::new(StatsQueue { stats })
    }

    fn report(&self) {
        for (i, name) in OPS.iter().enumerate() {
            let (count, errors, bytes, total_us, hist) = self.totals(i);
            if count == 0 {
                continue;
            }
            tracing::info!(
                op = name,
                count,
                errors,
                bytes,
                mean_us = total_us / count,
                p50_us_below = percentile_us(&hist, count, 50),
                p99_us_below = percentile_us(&hist, count, 99),
                "stats"
            );
        }
    }
}

struct StatsQueue {
    stats: Arc<QueueStats>,
}

impl QueueFilter for StatsQueue {
    fn submit(&mut self, _req: &mut Request, _now: Instant, _may_delay: bool) -> Verdict {
        Verdict::Pass
    }

    fn complete(&mut self, req: &mut Request, status: Status) -> Status {
        let s = &self.stats.ops[op_index(req.op)];
        let us = req.started.elapsed().as_micros() as u64;
        s.count.fetch_add(1, Relaxed);
        if status != Status::Ok {
            s.errors.fetch_add(1, Relaxed);
        }
        s.bytes.fetch_add(req.len, Relaxed);
        s.total_us.fetch_add(us, Relaxed);
        let bucket = (u64::BITS - us.leading_zeros()) as usize;
        s.hist[bucket.min(BUCKETS - 1)].fetch_add(1, Relaxed);
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Op;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut hist = [0u64; BUCKETS];
        hist[3] = 90; // < 8 us
        hist[10] = 10; // < 1024 us
        assert_eq!(percentile_us(&hist, 100, 50), 8);
        assert_eq!(percentile_us(&hist, 100, 90), 8);
        assert_eq!(percentile_us(&hist, 100, 99), 1024);
    }

    #[test]
    fn counts_per_operation() {
        let f = Stats::new(&"stats".parse().unwrap(), 2).unwrap();
        let mut q = f.queue_filter(1);
        let mut req = Request {
            op: Op::Write,
            len: 4096,
            ..Default::default()
        };
        assert_eq!(q.submit(&mut req, Instant::now(), true), Verdict::Pass);
        assert_eq!(q.complete(&mut req, Status::Ok), Status::Ok);
        assert_eq!(q.complete(&mut req, Status::IoErr), Status::IoErr);
        let (count, errors, bytes, _, _) = f.totals(1);
        assert_eq!((count, errors, bytes), (2, 1, 8192));
    }
}
