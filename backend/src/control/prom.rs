//! `metrics`: the counters as Prometheus text exposition (format 0.0.4),
//! encoded with prometheus-client.
//!
//! Names: `vmcrypt_requests_total`, `vmcrypt_bytes_total`,
//! `vmcrypt_errors_total` and `vmcrypt_request_duration_seconds` (a
//! histogram) with labels `queue` and `op`; `vmcrypt_refused_total`,
//! `vmcrypt_blocked_writes_total` and `vmcrypt_requests_in_flight` per
//! queue; `vmcrypt_capacity_bytes`,
//! `vmcrypt_frontend_connected` and `vmcrypt_uptime_seconds`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::Control;
use crate::metrics::{bucket_upper_ns, DiskMetrics, OpMetrics, QueueMetrics, OP_NAMES};

/// Histogram bounds exported, in seconds: 10 us to 10 s. The queues'
/// finer buckets are summed into these (each at its upper bound, so a
/// count may land one bound early by at most 12.5%).
const BOUNDS: [f64; 19] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
struct Disk {
    metrics: Arc<DiskMetrics>,
    capacity: u64,
    connected: Arc<AtomicBool>,
    started: Instant,
}

/// The exposition text, built on each call.
pub fn render(c: &Control) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Disk {
        metrics: c.metrics.clone(),
        capacity: c.served.disk.capacity.get(),
        connected: c.connected.clone(),
        started: c.started,
    }));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

type Labels = [(&'static str, String); 2];

fn labels(queue: usize, op: &str) -> Labels {
    [("queue", queue.to_string()), ("op", op.to_string())]
}

impl Disk {
    /// One labelled series per queue and operation of `value`.
    fn per_op(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        metric_type: MetricType,
        ops: &[usize],
        value: impl Fn(&OpMetrics, MetricEncoder) -> std::fmt::Result,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
        for (q, qm) in self.metrics.queues.iter().enumerate() {
            for &i in ops {
                let l = labels(q, OP_NAMES[i]);
                value(&qm.ops[i], m.encode_family(&l)?)?;
            }
        }
        Ok(())
    }

    /// One series per queue, labelled `queue`, of `value`.
    fn per_queue(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        metric_type: MetricType,
        value: impl Fn(&QueueMetrics, MetricEncoder) -> std::fmt::Result,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
        for (q, qm) in self.metrics.queues.iter().enumerate() {
            let l = [("queue", q.to_string())];
            value(qm, m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

impl Collector for Disk {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let all: Vec<usize> = (0..OP_NAMES.len()).collect();
        self.per_op(
            &mut enc,
            "vmcrypt_requests",
            "Requests completed, by queue and operation",
            MetricType::Counter,
            &all,
            |m, f| ConstCounter::new(m.ops.get()).encode(f),
        )?;
        self.per_op(
            &mut enc,
            "vmcrypt_bytes",
            "Bytes read or written by successful requests",
            MetricType::Counter,
            &[0, 1],
            |m, f| ConstCounter::new(m.bytes.get()).encode(f),
        )?;
        self.per_op(
            &mut enc,
            "vmcrypt_errors",
            "Requests completed with an error status",
            MetricType::Counter,
            &all,
            |m, f| ConstCounter::new(m.errors.get()).encode(f),
        )?;
        self.per_op(
            &mut enc,
            "vmcrypt_request_duration_seconds",
            "Time from taking a request from the ring to returning it",
            MetricType::Histogram,
            &all,
            |m, mut f| {
                let hist = m.latency.snapshot();
                let mut buckets: Vec<(f64, u64)> = BOUNDS.iter().map(|&b| (b, 0)).collect();
                let mut count = 0;
                for (i, &n) in hist.iter().enumerate() {
                    count += n;
                    let upper = bucket_upper_ns(i) as f64 / 1e9;
                    if let Some(b) = buckets.iter_mut().find(|(bound, _)| upper <= *bound) {
                        b.1 += n;
                    }
                }
                let sum = m.latency_sum_ns.get() as f64 / 1e9;
                f.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )
            },
        )?;
        self.per_queue(
            &mut enc,
            "vmcrypt_refused",
            "Descriptor chains refused before they became a request",
            MetricType::Counter,
            |q, f| ConstCounter::new(q.refused.get()).encode(f),
        )?;
        self.per_queue(
            &mut enc,
            "vmcrypt_blocked_writes",
            "Buffered writes that blocked the queue's thread (dirty-page throttling); \
             each sends the queue's writes through io_uring workers for a second",
            MetricType::Counter,
            |q, f| ConstCounter::new(q.blocked_writes.get()).encode(f),
        )?;
        self.per_queue(
            &mut enc,
            "vmcrypt_requests_in_flight",
            "Requests taken from the ring and not yet returned",
            MetricType::Gauge,
            |q, f| ConstGauge::new(q.in_flight() as i64).encode(f),
        )?;
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64| {
            ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
        };
        gauge(
            &mut enc,
            "vmcrypt_capacity_bytes",
            "Size of the disk the guest sees",
            self.capacity as f64,
        )?;
        gauge(
            &mut enc,
            "vmcrypt_frontend_connected",
            "1 while a vhost-user frontend is connected",
            f64::from(u8::from(self.connected.load(Ordering::Relaxed))),
        )?;
        gauge(
            &mut enc,
            "vmcrypt_uptime_seconds",
            "Time since serve started",
            self.started.elapsed().as_secs_f64(),
        )
    }
}
