//! The workload generator: a native vhost-user-blk frontend (libblkio) that
//! keeps a fixed number of requests in flight per queue and measures them.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub block: usize,
    pub depth: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Measured {
    pub ios: u64,
    /// All I/Os including the warm-up (the server's CPU time covers them too).
    pub all_ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs `w` on `queues` queues for `dur` (after a short warm-up). With
/// `poll`, the client busy-polls its completions (libblkio poll queues)
/// instead of sleeping until the server notifies it.
pub fn run(
    socket: &Path,
    w: Workload,
    queues: usize,
    dur: Duration,
    span: u64,
    poll: bool,
) -> Result<Measured, String> {
    fn e(what: &'static str) -> impl Fn(blkio::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("blkio"))?;
    b.set_str("path", socket.to_str().unwrap())
        .map_err(e("path"))?;
    b.connect().map_err(e("connect"))?;
    if poll {
        b.set_i32("num-queues", 0).map_err(e("num-queues"))?;
        b.set_i32("num-poll-queues", queues as i32)
            .map_err(e("num-poll-queues"))?;
    } else {
        b.set_i32("num-queues", queues as i32)
            .map_err(e("num-queues"))?;
    }
    let mut out = b.start().map_err(e("start"))?;
    if poll {
        out.queues = std::mem::take(&mut out.poll_queues);
    }
    let capacity = b.get_u64("capacity").map_err(e("capacity"))?.min(span);
    let per_queue = w.block * w.depth;
    let len = (per_queue * queues).next_multiple_of(2 << 20);
    let region = b.alloc_mem_region(len).map_err(e("alloc"))?;
    b.map_mem_region(&region).map_err(e("map"))?;
    // Fill write buffers with non-zero data.
    // SAFETY: the region is len bytes, mapped read-write for us.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, len) };

    let deadline_warm = Duration::from_millis(300);
    let threads: Vec<_> = out
        .queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let base = region.addr + qi * per_queue;
            std::thread::spawn(move || -> Result<(u64, u64, f64, Vec<u32>), String> {
                let blocks = capacity / w.block as u64;
                let mut rng =
                    0x2545_F491_4F6C_DD1Du64 ^ (qi as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut seq = (qi as u64 * blocks / 2) % blocks;
                let mut next_off = |rng: &mut u64| {
                    if w.random {
                        *rng ^= *rng << 13;
                        *rng ^= *rng >> 7;
                        *rng ^= *rng << 17;
                        (*rng % blocks) * w.block as u64
                    } else {
                        seq = (seq + 1) % blocks;
                        seq * w.block as u64
                    }
                };
                let mut submitted_at = vec![Instant::now(); w.depth];
                let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
                    let p = (base + slot * w.block) as *mut u8;
                    if w.write {
                        q.write(off, p, w.block, slot, ReqFlags::empty());
                    } else {
                        q.read(off, p, w.block, slot, ReqFlags::empty());
                    }
                };
                for (slot, at) in submitted_at.iter_mut().enumerate() {
                    *at = Instant::now();
                    submit(&mut q, slot, next_off(&mut rng));
                }
                let mut comps: Vec<MaybeUninit<Completion>> =
                    (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
                let start = Instant::now();
                let mut measuring = false;
                let mut t0 = start;
                let mut ios = 0u64;
                let mut all_ios = 0u64;
                let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
                loop {
                    let now = Instant::now();
                    if !measuring && now - start >= deadline_warm {
                        measuring = true;
                        t0 = now;
                    }
                    if measuring && now - t0 >= dur {
                        break;
                    }
                    let mut timeout = Duration::from_secs(10);
                    let n = q
                        .do_io(&mut comps, 1, Some(&mut timeout), None)
                        .map_err(|e| format!("do_io: {e}"))?;
                    if n == 0 {
                        return Err("no completion within 10 s".into());
                    }
                    let now = Instant::now();
                    for c in &comps[..n] {
                        // SAFETY: do_io initialised the first n completions.
                        let c = unsafe { c.assume_init_read() };
                        if c.ret != 0 {
                            return Err(format!("I/O failed: {}", c.ret));
                        }
                        let slot = c.user_data;
                        all_ios += 1;
                        if measuring {
                            ios += 1;
                            if lat.len() < lat.capacity() {
                                lat.push(
                                    (now - submitted_at[slot]).as_nanos().min(u32::MAX as u128)
                                        as u32,
                                );
                            }
                        }
                        submitted_at[slot] = now;
                        submit(&mut q, slot, next_off(&mut rng));
                    }
                }
                let secs = t0.elapsed().as_secs_f64();
                // Drain what is still in flight.
                let mut timeout = Duration::from_secs(10);
                let _ = q.do_io(&mut comps, w.depth, Some(&mut timeout), None);
                // Writes end with a flush, outside the timed span (its CPU
                // is the server's): a server must not leave the writes in
                // its cache (librbd's) for the next one measured to pay
                // for at the cluster.
                if w.write {
                    q.flush(usize::MAX, ReqFlags::empty());
                    let mut timeout = Duration::from_secs(60);
                    let n = q
                        .do_io(&mut comps, 1, Some(&mut timeout), None)
                        .map_err(|e| format!("flush: {e}"))?;
                    if n == 0 {
                        return Err("flush: no completion within 60 s".into());
                    }
                    // SAFETY: do_io initialised the first completion.
                    let c = unsafe { comps[0].assume_init_read() };
                    if c.ret != 0 {
                        return Err(format!("flush failed: {}", c.ret));
                    }
                }
                Ok((ios, all_ios, secs, lat))
            })
        })
        .collect();
    let mut m = Measured::default();
    let mut lat = Vec::new();
    for t in threads {
        let (ios, all_ios, secs, l) = t
            .join()
            .map_err(|_| "driver thread panicked".to_string())??;
        m.ios += ios;
        m.all_ios += all_ios;
        m.seconds = m.seconds.max(secs);
        lat.extend(l);
    }
    drop(b);
    m.iops = m.ios as f64 / m.seconds;
    m.mb_s = m.iops * w.block as f64 / 1e6;
    lat.sort_unstable();
    if !lat.is_empty() {
        m.mean_us = lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0;
        m.p50_us = lat[lat.len() / 2] as f64 / 1000.0;
        m.p99_us = lat[lat.len() * 99 / 100] as f64 / 1000.0;
    }
    Ok(m)
}
