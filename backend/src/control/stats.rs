//! `query-stats`: the queues' counters, per queue and in total.

use serde_json::{json, Map, Value};

use crate::metrics::{percentile_ns, DiskMetrics, QueueMetrics, OP_NAMES};

/// Counters and latency percentiles of one queue, or of several added up.
#[derive(Default)]
struct Sums {
    ops: [u64; 6],
    bytes: [u64; 6],
    errors: u64,
    in_flight: u64,
    blocked_writes: u64,
    hist: [Vec<u64>; 6],
}

impl Sums {
    fn add(&mut self, q: &QueueMetrics) {
        for (i, m) in q.ops.iter().enumerate() {
            self.ops[i] += m.ops.get();
            self.bytes[i] += m.bytes.get();
            self.errors += m.errors.get();
            let h = m.latency.snapshot();
            if self.hist[i].is_empty() {
                self.hist[i] = h;
            } else {
                self.hist[i].iter_mut().zip(h).for_each(|(a, b)| *a += b);
            }
        }
        self.errors += q.refused.get();
        self.in_flight += q.in_flight();
        self.blocked_writes += q.blocked_writes.get();
    }

    fn to_json(&self, histograms: bool) -> Map<String, Value> {
        let mut m = Map::new();
        for (i, name) in OP_NAMES.iter().enumerate() {
            m.insert(format!("{name}_ops"), self.ops[i].into());
        }
        m.insert("read_bytes".into(), self.bytes[0].into());
        m.insert("write_bytes".into(), self.bytes[1].into());
        m.insert("errors".into(), self.errors.into());
        m.insert("in_flight".into(), self.in_flight.into());
        m.insert("blocked_writes".into(), self.blocked_writes.into());
        let mut lat = Map::new();
        for (i, name) in OP_NAMES.iter().enumerate() {
            if self.ops[i] == 0 {
                continue;
            }
            let us = |p| percentile_ns(&self.hist[i], p).map(|ns| ns as f64 / 1000.0);
            lat.insert(
                (*name).into(),
                json!({"p50": us(0.5), "p99": us(0.99), "p999": us(0.999)}),
            );
        }
        m.insert("latency_us".into(), Value::Object(lat));
        if histograms {
            // Sparse: [bucket, count] for each bucket with a count.
            let mut h = Map::new();
            for (i, name) in OP_NAMES.iter().enumerate() {
                let pairs: Vec<Value> = self.hist[i]
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(b, &n)| json!([b, n]))
                    .collect();
                if !pairs.is_empty() {
                    h.insert((*name).into(), Value::Array(pairs));
                }
            }
            m.insert("histograms".into(), Value::Object(h));
        }
        m
    }
}

/// The `query-stats` result: `{"total": {...}, "queues": [{"queue": 0, ...}]}`.
/// Latencies are upper bounds of the histogram bucket the percentile
/// falls in (within 12.5%), in microseconds, from when a request was taken
/// from the ring to when it was returned. With `histograms`, each also
/// carries its latency histograms (`vmcrypt top` takes differences of them).
pub fn query(metrics: &DiskMetrics, histograms: bool) -> Value {
    let mut total = Sums::default();
    let mut queues = Vec::new();
    for (i, q) in metrics.queues.iter().enumerate() {
        let mut s = Sums::default();
        s.add(q);
        total.add(q);
        let mut m = s.to_json(histograms);
        m.insert("queue".into(), i.into());
        queues.push(Value::Object(m));
    }
    json!({"total": Value::Object(total.to_json(histograms)), "queues": queues})
}
