//! `align`: the bottom stage of a raw disk served with `--cache none`.
//!
//! Direct I/O takes buffers aligned in memory and in length
//! ([`DioAlign`]). A guest's buffers usually are (Linux aligns block I/O to
//! its logical block size); a request whose buffers are not goes through an
//! aligned bounce buffer: written from it after a copy, or read into it and
//! copied out. Encrypted disks need no such stage: the encrypt filter
//! bounces every request through aligned buffers already.
//!
//! Bounce buffers are bounded per queue as the encrypt filter's are
//! ([`BouncePool`]).

use std::time::Instant;

use super::bounce::BouncePool;
use super::{Filter, QueueFilter, Verdict};
use crate::direct::{gather, scatter, DioAlign};
use crate::request::{Bounce, Op, Request, Status};

pub struct Align {
    dio: DioAlign,
}

impl Align {
    pub fn new(dio: DioAlign) -> Self {
        Align { dio }
    }
}

impl Filter for Align {
    fn name(&self) -> &'static str {
        "align"
    }

    fn queue_filter(&self, _queue: usize) -> Box<dyn QueueFilter> {
        Box::new(AlignQueue {
            dio: self.dio,
            bounces: BouncePool::new(16),
        })
    }
}

struct AlignQueue {
    dio: DioAlign,
    bounces: BouncePool,
}

impl QueueFilter for AlignQueue {
    fn submit(&mut self, req: &mut Request, now: Instant, may_delay: bool) -> Verdict {
        if !matches!(req.op, Op::Read | Op::Write) || self.dio.fits(&req.iovs) {
            return Verdict::Pass;
        }
        let mut b = match self.bounces.take(req.len as usize, now, may_delay) {
            Ok(b) => b,
            Err(until) => return Verdict::Delay(until),
        };
        if req.op == Op::Write {
            gather(&req.iovs, &mut b);
        }
        req.bounce = Some(Bounce::new(b));
        Verdict::Pass
    }

    fn complete(&mut self, req: &mut Request, status: Status) -> Status {
        let Some(bounce) = req.bounce.take() else {
            return status;
        };
        if req.op == Op::Read && status == Status::Ok {
            scatter(&bounce.buf, &req.iovs);
        }
        self.bounces.give_back(bounce.buf);
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::AlignedBuf;
    use crate::filter::bounce::BOUNCE_BUDGET;
    use crate::request::Iov;

    #[test]
    fn only_misaligned_requests_are_bounced_and_reads_come_back() {
        let f = Align::new(DioAlign {
            mem: 512,
            offset: 512,
        });
        let mut q = f.queue_filter(0);
        let now = Instant::now();
        let mut aligned = AlignedBuf::zeroed(1024);
        let mut odd = vec![0u8; 1100];
        // SAFETY: the buffers outlive the requests.
        let (a, o) = unsafe {
            (
                Iov::new(aligned.as_mut_ptr(), 1024),
                Iov::new(odd.as_mut_ptr().add(1), 1024),
            )
        };
        let req = |iov: Iov, op| Request {
            op,
            offset: 0,
            len: 1024,
            iovs: vec![iov],
            ..Default::default()
        };
        let mut r = req(a, Op::Read);
        assert_eq!(q.submit(&mut r, now, true), Verdict::Pass);
        assert!(r.bounce.is_none(), "aligned buffers go straight to storage");
        let mut r = req(o, Op::Read);
        q.submit(&mut r, now, true);
        r.bounce.as_mut().expect("bounced").buf.fill(0x5a);
        assert_eq!(q.complete(&mut r, Status::Ok), Status::Ok);
        assert!(odd[1..1025].iter().all(|&x| x == 0x5a));
        assert_eq!((odd[0], odd[1025]), (0, 0));
        let mut w = req(o, Op::Write);
        q.submit(&mut w, now, true);
        assert_eq!(&w.bounce.as_ref().unwrap().buf[..], &odd[1..1025]);
        // A second large request waits while one holds the budget.
        let mut big = Request {
            len: BOUNCE_BUDGET as u64,
            ..req(o, Op::Write)
        };
        assert!(matches!(q.submit(&mut big, now, true), Verdict::Delay(_)));
        q.complete(&mut w, Status::Ok);
    }
}
