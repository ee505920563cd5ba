//! A queue filter's bounce buffers (encrypt, align), bounded per queue: a
//! request that would take the queue past [`BOUNCE_BUDGET`] waits (the
//! pipeline's Delay) until earlier ones complete, so a guest cannot make the
//! host allocate without limit. Returned buffers are kept for reuse.

use std::time::{Duration, Instant};

use crate::direct::AlignedBuf;

/// Most bytes of bounce buffers one queue holds at once.
pub const BOUNCE_BUDGET: usize = 64 << 20;
/// How long a request waits for bounce buffer room before it asks again.
const BOUNCE_RETRY: Duration = Duration::from_micros(50);
/// Buffers larger than this are not kept for reuse.
const KEEP_MAX: usize = 1 << 20;

pub struct BouncePool {
    /// Buffers returned by completed requests, for reuse.
    spare: Vec<AlignedBuf>,
    /// At most this many are kept.
    keep: usize,
    /// Bytes of bounce buffers held by requests in flight.
    outstanding: usize,
}

impl BouncePool {
    pub fn new(keep: usize) -> Self {
        BouncePool {
            spare: Vec::new(),
            keep,
            outstanding: 0,
        }
    }

    /// A buffer of `len` bytes (new bytes zero), counted against the budget
    /// until it is given back; or when to ask again. One request always
    /// goes, however large; more wait for room, unless the queue is
    /// draining (`may_delay` false).
    pub fn take(
        &mut self,
        len: usize,
        now: Instant,
        may_delay: bool,
    ) -> Result<AlignedBuf, Instant> {
        if may_delay && self.outstanding > 0 && self.outstanding + len > BOUNCE_BUDGET {
            return Err(now + BOUNCE_RETRY);
        }
        self.outstanding += len;
        let mut b = self.spare.pop().unwrap_or_default();
        b.resize(len);
        Ok(b)
    }

    /// Returns a buffer from `take`.
    pub fn give_back(&mut self, buf: AlignedBuf) {
        self.outstanding -= buf.len();
        if buf.capacity() <= KEEP_MAX && self.spare.len() < self.keep {
            self.spare.push(buf);
        }
    }
}
