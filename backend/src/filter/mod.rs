//! The filter pipeline: every request passes the configured filters in
//! order on its way down to storage, and in reverse order on its way back.
//!
//! A filter is two objects: a [`Filter`], created once per `serve` from its
//! spec and shared by all queues and connections (it holds what must outlive
//! a connection, such as counters), and a [`QueueFilter`] per queue, owned by
//! that queue's worker thread, so the hot path takes no lock across queues.
//!
//! On the way down ([`QueueFilter::submit`]) a filter may transform the
//! request (for writes, only into a [`crate::request::Bounce`] buffer: guest
//! memory is never modified on a write), pass it on, complete it itself, or
//! ask for it to be retried later. On the way up ([`QueueFilter::complete`])
//! it sees the status and may transform read data in place in guest buffers.

mod align;
mod bounce;
mod encrypt;
mod stats;
mod throttle;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

pub use align::Align;
pub use encrypt::Encrypt;
pub use stats::Stats;
pub use throttle::Throttle;

use crate::request::{Request, Status};

/// What a filter decides for a request on its way down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the request to the next stage.
    Pass,
    /// Complete the request now with this status; later stages never see it.
    Complete(Status),
    /// Ask again no earlier than this instant (the request waits in the queue
    /// worker, in order, and this filter's `submit` is called again).
    Delay(Instant),
}

/// A filter as configured: shared by all queues, lives for the whole `serve`.
pub trait Filter: Send + Sync {
    /// The filter's name as used in `--filter NAME:...`.
    fn name(&self) -> &'static str;
    /// Creates the state this filter keeps for queue `queue`.
    fn queue_filter(&self, queue: usize) -> Box<dyn QueueFilter>;
    /// Logs what the filter has to report (on SIGUSR1 and at exit).
    fn report(&self) {}
}

/// A filter's per-queue state, used by that queue's worker only.
pub trait QueueFilter: Send {
    /// The request on its way down. With `may_delay` false (the queue is
    /// being drained) the filter must not answer `Delay`: it does its work
    /// now and passes the request on, or completes it.
    fn submit(&mut self, req: &mut Request, now: Instant, may_delay: bool) -> Verdict;
    /// The request on its way up, for filters whose `submit` passed it on.
    /// Returns the status to report upwards.
    fn complete(&mut self, req: &mut Request, status: Status) -> Status {
        let _ = req;
        status
    }
}

/// Errors in a `--filter` spec.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("unknown filter '{0}' (known: stats, throttle)")]
    Unknown(String),
    #[error("filter '{filter}': {reason}")]
    Invalid { filter: String, reason: String },
}

/// A parsed `NAME[:key=value,...]` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterSpec {
    pub name: String,
    pub params: Vec<(String, String)>,
}

impl std::str::FromStr for FilterSpec {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut params = Vec::new();
        for kv in rest.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| FilterError::Invalid {
                filter: name.to_string(),
                reason: format!("expected key=value, got '{kv}'"),
            })?;
            params.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(FilterSpec {
            name: name.trim().to_string(),
            params,
        })
    }
}

impl fmt::Display for FilterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// Builds a stock filter from its spec.
pub fn build(spec: &FilterSpec, num_queues: usize) -> Result<Arc<dyn Filter>, FilterError> {
    match spec.name.as_str() {
        "stats" => Ok(Arc::new(Stats::new(spec, num_queues)?)),
        "throttle" => Ok(Arc::new(Throttle::new(spec, num_queues)?)),
        other => Err(FilterError::Unknown(other.to_string())),
    }
}

/// The filters of one queue, in order.
pub struct Pipeline {
    stages: Vec<Box<dyn QueueFilter>>,
}

/// Where a request stands after going down the pipeline.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed every filter: send it to storage.
    ToStorage,
    /// Completed by the filter at this stage (not counting it in `complete`).
    Completed { stage: usize, status: Status },
    /// Waiting at this stage until the instant.
    Delayed { stage: usize, until: Instant },
}

impl Pipeline {
    pub fn new(filters: &[Arc<dyn Filter>], queue: usize) -> Self {
        Pipeline {
            stages: filters.iter().map(|f| f.queue_filter(queue)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.stages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Sends `req` down from stage `from`. With `force` (draining a queue)
    /// no filter may delay it. A filter is never skipped: it alone knows
    /// what it must do to a request (the encrypt filter, for one, must
    /// encrypt every write), so the choice to hurry is left to it.
    pub fn submit(&mut self, req: &mut Request, from: usize, now: Instant, force: bool) -> Outcome {
        for (stage, f) in self.stages.iter_mut().enumerate().skip(from) {
            match f.submit(req, now, !force) {
                Verdict::Pass => {}
                Verdict::Complete(status) => return Outcome::Completed { stage, status },
                Verdict::Delay(until) if !force => return Outcome::Delayed { stage, until },
                Verdict::Delay(_) => {
                    tracing::error!(
                        stage,
                        "a filter asked to delay a request while the queue drains; failing it"
                    );
                    return Outcome::Completed {
                        stage,
                        status: Status::IoErr,
                    };
                }
            }
        }
        Outcome::ToStorage
    }

    /// Sends a completion up through the stages below `upto` (exclusive), in
    /// reverse order; returns the status for the guest.
    pub fn complete(&mut self, req: &mut Request, upto: usize, mut status: Status) -> Status {
        for f in self.stages[..upto].iter_mut().rev() {
            status = f.complete(req, status);
        }
        status
    }
}

/// Reads a parameter as a number with an optional k/M/G suffix (powers of 1000
/// for rates are not used: k=1024 like the rest of the CLI).
pub(crate) fn param_u64(spec: &FilterSpec, key: &str) -> Result<Option<u64>, FilterError> {
    let Some((_, v)) = spec.params.iter().find(|(k, _)| k == key) else {
        return Ok(None);
    };
    crate::config::parse_size(v)
        .map(Some)
        .map_err(|e| FilterError::Invalid {
            filter: spec.name.clone(),
            reason: format!("{key}: {e}"),
        })
}

/// Rejects parameters the filter does not know.
pub(crate) fn check_keys(spec: &FilterSpec, known: &[&str]) -> Result<(), FilterError> {
    for (k, _) in &spec.params {
        if !known.contains(&k.as_str()) {
            return Err(FilterError::Invalid {
                filter: spec.name.clone(),
                reason: format!("unknown parameter '{k}' (known: {})", known.join(", ")),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Iov, Op};

    #[test]
    fn a_draining_queue_still_runs_every_filter() {
        // A throttle with no tokens left, above the encrypt filter: draining
        // must not skip encryption by skipping a delaying stage.
        let throttle = build(
            &"throttle:write_iops_sec=1,write_iops_sec_burst=1"
                .parse()
                .unwrap(),
            1,
        )
        .unwrap();
        let encrypt: Arc<dyn Filter> =
            Arc::new(Encrypt::new(vmcrypt_crypto::MasterKey::generate()).unwrap());
        let mut p = Pipeline::new(&[throttle, encrypt], 0);
        let mut data = vec![0x42u8; 4096];
        let mut write = || Request {
            op: Op::Write,
            offset: 0,
            len: 4096,
            // SAFETY: data outlives the request.
            iovs: vec![unsafe { Iov::new(data.as_mut_ptr(), 4096) }],
            ..Default::default()
        };
        let now = Instant::now();
        let mut first = write();
        assert_eq!(p.submit(&mut first, 0, now, false), Outcome::ToStorage);
        let mut second = write();
        assert!(matches!(
            p.submit(&mut second, 0, now, false),
            Outcome::Delayed { stage: 0, .. }
        ));
        assert_eq!(p.submit(&mut second, 0, now, true), Outcome::ToStorage);
        let bounce = second
            .bounce
            .as_ref()
            .expect("the write was encrypted into a bounce buffer");
        assert_ne!(&bounce.buf[..], &[0x42u8; 4096][..]);
    }
}
