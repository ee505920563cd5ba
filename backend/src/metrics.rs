//! Counters and latency histograms of every request, per queue, always on.
//!
//! Each queue's worker is the only writer of its [`QueueMetrics`]: it
//! updates a counter with a plain load and store (no read-modify-write, no
//! lock), and a reader (the control socket) loads the values whenever it is
//! asked. Counters are kept since `serve` started, across frontend
//! connections. Queues never share a counter, so the data path gains no
//! contended cache line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::request::{Op, Status};

/// The operations counted, by [`op_index`].
pub const OP_NAMES: [&str; 6] = [
    "read",
    "write",
    "flush",
    "discard",
    "write_zeroes",
    "get_id",
];

/// Where `op` is counted: its index into [`OP_NAMES`] and per-operation
/// tables.
pub fn op_index(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::Flush => 2,
        Op::Discard => 3,
        Op::WriteZeroes { .. } => 4,
        Op::GetId => 5,
    }
}

/// A counter with one writer: the owning queue's thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning thread may call this (load and store are
    /// not one atomic step).
    #[inline]
    fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Latency buckets, log-linear in nanoseconds: values below 8 ns get a
/// bucket each, then every power of two is split into 8 (12.5% precision),
/// up to 2^40 ns (18 minutes); slower requests land in the last bucket.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const MAX_EXP: u32 = 40;
pub const BUCKETS: usize = SUB + (MAX_EXP - SUB_BITS + 1) as usize * SUB;

/// The bucket of a latency of `ns`.
fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (ns >> (exp - SUB_BITS)) as usize & (SUB - 1);
    SUB + (exp - SUB_BITS) as usize * SUB + sub
}

/// The largest latency bucket `i` holds, in nanoseconds.
pub fn bucket_upper_ns(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let exp = (i - SUB) / SUB + SUB_BITS as usize;
    let sub = ((i - SUB) % SUB) as u64;
    ((SUB as u64 + sub + 1) << (exp - SUB_BITS as usize)) - 1
}

/// A latency histogram with one writer.
#[derive(Debug)]
pub struct Histogram([Counter; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(std::array::from_fn(|_| Counter::default()))
    }
}

impl Histogram {
    #[inline]
    fn record(&self, ns: u64) {
        self.0[bucket(ns)].add(1);
    }

    /// The bucket counts now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.0.iter().map(Counter::get).collect()
    }
}

/// What one queue counts for one operation.
#[derive(Default, Debug)]
pub struct OpMetrics {
    pub ops: Counter,
    pub bytes: Counter,
    pub errors: Counter,
    pub latency: Histogram,
    /// Sum of the latencies, in nanoseconds.
    pub latency_sum_ns: Counter,
}

/// Everything one queue counts.
#[derive(Default, Debug)]
pub struct QueueMetrics {
    pub ops: [OpMetrics; 6],
    /// Chains refused before their type was known (malformed descriptors,
    /// unknown types). A request of a known type that is refused (out of
    /// range, a write to a read-only disk) counts as that operation, with
    /// an error.
    pub refused: Counter,
    /// Requests taken from the ring, and returned to it.
    pub taken: Counter,
    pub returned: Counter,
    /// Buffered writes the queue's thread made that blocked (dirty-page
    /// throttling, a page read from disk); each sent the queue's writes
    /// through io_uring's workers for a while ([`crate::inline_write`]).
    pub blocked_writes: Counter,
}

impl QueueMetrics {
    /// A request taken from the ring.
    #[inline]
    pub fn take(&self) {
        self.taken.add(1);
    }

    /// A request completed with `status` after `latency`.
    #[inline]
    pub fn complete(&self, op: Op, bytes: u64, status: Status, latency: Duration) {
        let m = &self.ops[op_index(op)];
        m.ops.add(1);
        if status == Status::Ok {
            m.bytes.add(bytes);
        } else {
            m.errors.add(1);
        }
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        m.latency.record(ns);
        m.latency_sum_ns.add(ns);
        self.returned.add(1);
    }

    /// A buffered write on the queue's thread blocked.
    #[inline]
    pub fn blocked_write(&self) {
        self.blocked_writes.add(1);
    }

    /// A chain refused before it became a request.
    #[inline]
    pub fn refuse(&self) {
        self.refused.add(1);
        self.returned.add(1);
    }

    /// Requests taken and not yet returned.
    pub fn in_flight(&self) -> u64 {
        self.taken.get().saturating_sub(self.returned.get())
    }
}

/// The disk's metrics: one [`QueueMetrics`] per queue, each in its own
/// allocation, kept for the life of `serve`.
#[derive(Debug)]
pub struct DiskMetrics {
    pub queues: Vec<Arc<QueueMetrics>>,
}

impl DiskMetrics {
    pub fn new(num_queues: usize) -> Self {
        DiskMetrics {
            queues: (0..num_queues).map(|_| Arc::default()).collect(),
        }
    }
}

/// Latency percentile `p` (0..1) of a histogram snapshot, as the upper
/// bound of the bucket it falls in, in nanoseconds; None when empty.
pub fn percentile_ns(hist: &[u64], p: f64) -> Option<u64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64 * p).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some(bucket_upper_ns(i));
        }
    }
    Some(bucket_upper_ns(hist.len() - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency_in_order() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 30, (1 << 40) - 1, 1 << 40, u64::MAX]) {
            let b = bucket(ns);
            assert!(b < BUCKETS, "{ns}");
            assert!(b >= last || ns >= 1 << 30, "{ns}");
            last = b;
            if ns < 1 << 41 {
                assert!(ns <= bucket_upper_ns(b), "{ns} above bucket {b}");
                if b > 0 {
                    assert!(ns > bucket_upper_ns(b - 1), "{ns} below bucket {b}");
                }
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn precision_is_an_eighth() {
        for ns in [1000u64, 123_456, 9_999_999] {
            let up = bucket_upper_ns(bucket(ns));
            assert!(up as f64 <= ns as f64 * 1.126, "{ns} -> {up}");
        }
    }

    #[test]
    fn percentiles_and_counts() {
        let q = QueueMetrics::default();
        for i in 0..100u64 {
            q.take();
            let lat = if i < 90 { 10_000 } else { 1_000_000 };
            let status = if i == 0 { Status::IoErr } else { Status::Ok };
            q.complete(Op::Write, 4096, status, Duration::from_nanos(lat));
        }
        q.take();
        let w = &q.ops[1];
        assert_eq!(
            (w.ops.get(), w.errors.get(), w.bytes.get()),
            (100, 1, 99 * 4096)
        );
        assert_eq!(q.in_flight(), 1);
        let h = w.latency.snapshot();
        let p50 = percentile_ns(&h, 0.5).unwrap();
        let p99 = percentile_ns(&h, 0.99).unwrap();
        assert!((10_000..11_300).contains(&p50), "{p50}");
        assert!((1_000_000..1_130_000).contains(&p99), "{p99}");
        assert_eq!(percentile_ns(&q.ops[0].latency.snapshot(), 0.5), None);
    }
}
