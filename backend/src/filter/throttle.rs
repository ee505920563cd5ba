//! `throttle`: IOPS and bandwidth limits with bursts, like libvirt's `<iotune>`.
//!
//! Each configured limit is a token bucket refilled at its rate and holding
//! at most its burst. A request may start when every bucket that applies to
//! it holds a positive level; it then takes its cost (one I/O, or its bytes),
//! which may leave a bucket in debt, so the long-run rate is exact even for
//! requests larger than the burst. Limits are per disk, so the buckets are
//! shared by the queues behind one mutex: the only cross-queue lock, taken
//! only while a limit is set.
//!
//! Limits can change while the disk is served ([`Throttle::update`], the
//! control socket's `set-throttle`). With the control socket on, a throttle
//! with no limits sits in the pipeline: each queue then checks only its own
//! flag, which changes only when the limits do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{param_u64, Filter, FilterError, FilterSpec, QueueFilter, Verdict};
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
    /// The rate and burst as given (burst None: the default).
    given: (u64, Option<u64>),
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: Option<u64>) -> Self {
        // Default burst: a tenth of a second's worth, at least one unit.
        let given = (rate, burst);
        let burst = burst.map_or((rate as f64 / 10.0).max(1.0), |b| b.max(1) as f64);
        Bucket {
            rate: rate as f64,
            given,
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

/// The `throttle` filter: its limits, and one flag per queue that says
/// whether any limit is set.
pub struct Throttle {
    buckets: Arc<Mutex<Buckets>>,
    active: Vec<Arc<AtomicBool>>,
}

/// The order of `KEYS` and of the bucket table.
const KINDS: [Kind; 6] = [
    Kind::TotalIops,
    Kind::ReadIops,
    Kind::WriteIops,
    Kind::TotalBytes,
    Kind::ReadBytes,
    Kind::WriteBytes,
];

impl Throttle {
    /// The filter as configured by `spec`, which must set a limit.
    pub fn new(spec: &FilterSpec, num_queues: usize) -> Result<Self, FilterError> {
        let t = Throttle::unlimited(num_queues);
        let changes = spec
            .params
            .iter()
            .map(|(k, _)| Ok((k.clone(), param_u64(spec, k)?.unwrap_or(0))))
            .collect::<Result<Vec<_>, FilterError>>()?;
        if let Some((k, _)) = changes
            .iter()
            .find(|(k, v)| *v == 0 && KEYS[..6].contains(&k.as_str()))
        {
            return Err(invalid(format!("{k} must be positive")));
        }
        t.update(&changes)?;
        if !t.is_active() {
            return Err(invalid(format!(
                "set at least one limit ({})",
                KEYS[..6].join(", ")
            )));
        }
        Ok(t)
    }

    /// A throttle with no limit yet (for the control socket to set).
    pub fn unlimited(num_queues: usize) -> Self {
        Throttle {
            buckets: Arc::default(),
            active: (0..num_queues.max(1)).map(|_| Arc::default()).collect(),
        }
    }

    /// Changes limits by name (libvirt `<iotune>` names, `_burst` for a
    /// burst); 0 removes a limit or sets a burst back to its default.
    /// Limits not named keep their value. All or nothing: a bad name or a
    /// burst without its limit changes nothing.
    pub fn update(&self, changes: &[(String, u64)]) -> Result<(), FilterError> {
        for (k, _) in changes {
            if !KEYS.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "unknown limit '{k}' (known: {})",
                    KEYS.join(", ")
                )));
            }
        }
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: [(u64, Option<u64>); 6] =
            std::array::from_fn(|i| b.0[i].as_ref().map_or((0, None), |b| b.given));
        for (k, v) in changes {
            let i = KEYS.iter().position(|x| x == k).expect("checked above");
            match i {
                0..6 => next[i].0 = *v,
                _ => next[i - 6].1 = (*v > 0).then_some(*v),
            }
        }
        if let Some(i) = (0..6).find(|&i| next[i].0 == 0 && next[i].1.is_some()) {
            return Err(invalid(format!("{} needs {}", KEYS[i + 6], KEYS[i])));
        }
        for (i, kind) in KINDS.into_iter().enumerate() {
            let slot = &mut b.0[kind as usize];
            let unchanged = slot.as_ref().map(|b| b.given) == Some(next[i]);
            if !unchanged {
                *slot = (next[i].0 > 0).then(|| Bucket::new(next[i].0, next[i].1));
            }
        }
        let any = b.0.iter().any(Option::is_some);
        for a in &self.active {
            a.store(any, Ordering::Release);
        }
        Ok(())
    }

    /// The limits set now, by name (bursts only where given).
    pub fn limits(&self) -> Vec<(&'static str, u64)> {
        let b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for i in 0..6 {
            if let Some(bucket) = &b.0[KINDS[i] as usize] {
                out.push((KEYS[i], bucket.given.0));
                if let Some(burst) = bucket.given.1 {
                    out.push((KEYS[i + 6], burst));
                }
            }
        }
        out
    }

    fn is_active(&self) -> bool {
        self.active[0].load(Ordering::Acquire)
    }
}

fn invalid(reason: String) -> FilterError {
    FilterError::Invalid {
        filter: "throttle".into(),
        reason,
    }
}

impl Filter for Throttle {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn queue_filter(&self, queue: usize) -> Box<dyn QueueFilter> {
        Box::new(ThrottleQueue {
            buckets: self.buckets.clone(),
            active: self.active[queue % self.active.len()].clone(),
        })
    }
}

struct ThrottleQueue {
    buckets: Arc<Mutex<Buckets>>,
    /// This queue's copy of "some limit is set".
    active: Arc<AtomicBool>,
}

impl QueueFilter for ThrottleQueue {
    fn submit(&mut self, req: &mut Request, now: Instant, may_delay: bool) -> Verdict {
        if !self.active.load(Ordering::Acquire) {
            return Verdict::Pass;
        }
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
        Throttle::new(&spec.parse().unwrap(), 1).unwrap()
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
            assert!(Throttle::new(&bad.parse().unwrap(), 1).is_err(), "{bad}");
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

    #[test]
    fn limits_change_live_and_zero_removes_them() {
        let t = Throttle::unlimited(2);
        let mut q = t.queue_filter(1);
        let mut req = Request {
            op: Op::Read,
            len: 4096,
            ..Default::default()
        };
        let now = Instant::now();
        // No limit: never delayed.
        for _ in 0..1000 {
            assert_eq!(q.submit(&mut req, now, true), Verdict::Pass);
        }
        let set = |k: &str, v| (k.to_string(), v);
        t.update(&[set("read_iops_sec", 10), set("read_iops_sec_burst", 2)])
            .unwrap();
        assert_eq!(
            t.limits(),
            [("read_iops_sec", 10), ("read_iops_sec_burst", 2)]
        );
        assert_eq!(q.submit(&mut req, now, true), Verdict::Pass);
        assert_eq!(q.submit(&mut req, now, true), Verdict::Pass);
        assert!(matches!(q.submit(&mut req, now, true), Verdict::Delay(_)));
        // Another limit changes; the first keeps its rate and burst.
        t.update(&[set("write_bytes_sec", 1 << 20)]).unwrap();
        assert_eq!(t.limits().len(), 3);
        // Bad changes change nothing.
        assert!(t.update(&[set("iops", 5)]).is_err());
        assert!(t.update(&[set("total_iops_sec_burst", 5)]).is_err());
        assert_eq!(t.limits().len(), 3);
        // 0 removes.
        t.update(&[set("read_iops_sec", 0), set("read_iops_sec_burst", 0)])
            .unwrap();
        t.update(&[set("write_bytes_sec", 0)]).unwrap();
        assert!(t.limits().is_empty());
        assert_eq!(q.submit(&mut req, now, true), Verdict::Pass);
    }
}
