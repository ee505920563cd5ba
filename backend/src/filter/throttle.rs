//! `throttle`: IOPS and bandwidth limits with bursts, like libvirt's `<iotune>`.
//!
//! Each configured limit is a token bucket refilled at its rate and holding
//! at most its burst. A request may start when every bucket that applies to
//! it holds a positive level; it then takes its cost (one I/O, or its bytes),
//! which may leave a bucket in debt, so the long-run rate is exact even for
//! requests larger than the burst. Limits are per disk, so the buckets are
//! shared by the queues behind one mutex: the only cross-queue lock, taken
//! only when this filter is configured.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{check_keys, param_u64, Filter, FilterError, FilterSpec, QueueFilter, Verdict};
use crate::request::{Op, Request};

const KEYS: [&str; 12] = [
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
    "total_iops_sec_burst",
    "read_iops_sec_burst",
    "write_iops_sec_burst",
    "total_bytes_sec_burst",
    "read_bytes_sec_burst",
    "write_bytes_sec_burst",
];

#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: Option<u64>) -> Self {
        // Default burst: a tenth of a second's worth, at least one unit.
        let burst = burst.map_or((rate as f64 / 10.0).max(1.0), |b| b.max(1) as f64);
        Bucket {
            rate: rate as f64,
            burst,
            level: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// When the level will be positive again (None: it is now).
    fn ready_at(&self, now: Instant) -> Option<Instant> {
        if self.level > 0.0 {
            None
        } else {
            let secs = (-self.level / self.rate).max(0.0) + 1e-6;
            Some(now + Duration::from_secs_f64(secs))
        }
    }
}

/// Indexes into the bucket table.
#[derive(Clone, Copy)]
enum Kind {
    TotalIops,
    ReadIops,
    WriteIops,
    TotalBytes,
    ReadBytes,
    WriteBytes,
}

#[derive(Debug, Default)]
struct Buckets([Option<Bucket>; 6]);

impl Buckets {
    /// Admits a request of `op` and `bytes` now, or says when to ask again.
    /// With `must`, it is admitted regardless (its cost still taken).
    fn admit(&mut self, op: Op, bytes: u64, now: Instant, must: bool) -> Option<Instant> {
        let (iops, bps) = match op {
            Op::Read => (Kind::ReadIops, Kind::ReadBytes),
            Op::Write | Op::Discard | Op::WriteZeroes { .. } => (Kind::WriteIops, Kind::WriteBytes),
            Op::Flush | Op::GetId => return None,
        };
        // Discard and write-zeroes move no data: they cost an I/O only.
        let bytes = if op == Op::Read || op == Op::Write {
            bytes
        } else {
            0
        };
        let applies = [
            (Kind::TotalIops, 1.0),
            (iops, 1.0),
            (Kind::TotalBytes, bytes as f64),
            (bps, bytes as f64),
        ];
        let mut wait: Option<Instant> = None;
        for (k, _) in applies {
            if let Some(b) = &mut self.0[k as usize] {
                b.refill(now);
                if let Some(t) = b.ready_at(now) {
                    wait = Some(wait.map_or(t, |w| w.max(t)));
                }
            }
        }
        if wait.is_some() && !must {
            return wait;
        }
        for (k, cost) in applies {
            if let Some(b) = &mut self.0[k as usize] {
                b.level -= cost;
            }
        }
        None
    }
}

/// The configured `throttle` filter.
pub struct Throttle {
    buckets: Arc<Mutex<Buckets>>,
}

impl Throttle {
    pub fn new(spec: &FilterSpec) -> Result<Self, FilterError> {
        check_keys(spec, &KEYS)?;
        let mut buckets = Buckets::default();
        let kinds = [
            Kind::TotalIops,
            Kind::ReadIops,
            Kind::WriteIops,
            Kind::TotalBytes,
            Kind::ReadBytes,
            Kind::WriteBytes,
        ];
        let mut any = false;
        for (i, kind) in kinds.into_iter().enumerate() {
            let rate = param_u64(spec, KEYS[i])?;
            let burst = param_u64(spec, KEYS[i + 6])?;
            match (rate, burst) {
                (Some(0), _) => {
                    return Err(FilterError::Invalid {
                        filter: spec.name.clone(),
                        reason: format!("{} must be positive", KEYS[i]),
                    })
                }
                (Some(rate), burst) => {
                    buckets.0[kind as usize] = Some(Bucket::new(rate, burst));
                    any = true;
                }
                (None, Some(_)) => {
                    return Err(FilterError::Invalid {
                        filter: spec.name.clone(),
                        reason: format!("{} needs {}", KEYS[i + 6], KEYS[i]),
                    })
                }
                (None, None) => {}
            }
        }
        if !any {
            return Err(FilterError::Invalid {
                filter: spec.name.clone(),
                reason: format!("set at least one limit ({})", KEYS[..6].join(", ")),
            });
        }
        Ok(Throttle {
            buckets: Arc::new(Mutex::new(buckets)),
        })
    }
}

impl Filter for Throttle {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn queue_filter(&self, _queue: usize) -> Box<dyn QueueFilter> {
        Box::new(ThrottleQueue {
            buckets: self.buckets.clone(),
        })
    }
}

struct ThrottleQueue {
    buckets: Arc<Mutex<Buckets>>,
}

impl QueueFilter for ThrottleQueue {
    fn submit(&mut self, req: &mut Request, now: Instant, may_delay: bool) -> Verdict {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match b.admit(req.op, req.len, now, !may_delay) {
            None => Verdict::Pass,
            Some(t) => Verdict::Delay(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(spec: &str) -> Throttle {
        Throttle::new(&spec.parse().unwrap()).unwrap()
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "throttle",
            "throttle:total_iops_sec=0",
            "throttle:iops=5",
            "throttle:read_iops_sec_burst=5",
            "throttle:total_iops_sec=abc",
        ] {
            assert!(Throttle::new(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn iops_limit_holds_over_simulated_time() {
        let t = throttle("throttle:total_iops_sec=1000");
        let mut b = t.buckets.lock().unwrap();
        let start = Instant::now();
        let mut now = start;
        let mut admitted = 0u64;
        // A greedy client retrying exactly when told, for 2 simulated seconds.
        while now < start + Duration::from_secs(2) {
            match b.admit(Op::Read, 4096, now, false) {
                None => admitted += 1,
                Some(t) => now = t,
            }
        }
        // 2 s at 1000/s plus the initial burst of 100.
        assert!((2000..=2101).contains(&admitted), "{admitted}");
    }

    #[test]
    fn bandwidth_limit_applies_to_writes_only() {
        let t = throttle("throttle:write_bytes_sec=1M,write_bytes_sec_burst=64k");
        let mut b = t.buckets.lock().unwrap();
        let now = Instant::now();
        assert!(b.admit(Op::Write, 1 << 20, now, false).is_none()); // goes into debt
        assert!(b.admit(Op::Write, 4096, now, false).is_some());
        assert!(b.admit(Op::Read, 1 << 20, now, false).is_none());
        assert!(b.admit(Op::Flush, 0, now, false).is_none());
    }
}
