//! `encrypt`: AES-256-XTS at rest, the bottom stage of the pipeline.
//!
//! Writes are encrypted from the guest's buffers into a per-queue bounce
//! buffer in one pass (guest memory is never modified on a write). Reads go
//! from storage into a bounce buffer and are decrypted from there into the
//! guest's buffers, also in one pass: ciphertext never reaches guest memory
//! (a guest racing the completion could otherwise have chosen ciphertext
//! decrypted at a chosen sector), as with QEMU's LUKS driver. A large read
//! whose ciphertext is all in the host's page cache skips storage and the
//! bounce buffer: it is decrypted straight from a mapping of the image
//! ([`crate::pagecache`]) and completed here, saving the kernel's copy.
//! The tweak is the sector number counted from the start of the payload
//! (LUKS1 `plain64`). Each queue has its own engine, so the AES key
//! schedules are expanded once per queue.
//!
//! WRITE_ZEROES writes encrypted zeroes (a hole would decrypt to noise);
//! DISCARD punches a hole, after which reads of that range return
//! unpredictable data, as the virtio spec allows for discarded blocks.
//!
//! Bounce buffers are bounded per queue ([`BouncePool`]): a guest cannot make
//! the host allocate without limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vmcrypt_crypto::{MasterKey, Xts, XtsError, SECTOR};

use super::bounce::BouncePool;
use super::{Filter, QueueFilter, Verdict};
use crate::pagecache::PageCacheView;
use crate::request::{Bounce, Iov, Op, Request, Status};

/// Smallest read taken straight from the page cache. Below this, the
/// kernel copy that the mapping saves costs less than the `mincore` call
/// and the cold page-table walks that it adds (4 KiB random reads went from
/// 588k to 373k IOPS through the mapping).
const CACHED_READ_MIN: u64 = 64 << 10;

pub struct Encrypt {
    key: Arc<MasterKey>,
    view: Option<Arc<PageCacheView>>,
    /// Reads (and their bytes) decrypted straight from the page cache.
    cached: Arc<CachedReads>,
}

#[derive(Default)]
struct CachedReads {
    reads: AtomicU64,
    bytes: AtomicU64,
}

impl Encrypt {
    pub fn new(key: MasterKey) -> Result<Self, XtsError> {
        Xts::new(&key)?; // refuse a bad key now, not per queue
        Ok(Encrypt {
            key: Arc::new(key),
            view: None,
            cached: Arc::default(),
        })
    }

    /// Reads whose ciphertext is all in the host's page cache are decrypted
    /// straight from `view` into the guest's buffers, and completed here.
    pub fn reading_cached_from(mut self, view: Option<Arc<PageCacheView>>) -> Self {
        self.view = view;
        self
    }
}

impl Filter for Encrypt {
    fn name(&self) -> &'static str {
        "encrypt"
    }

    fn queue_filter(&self, _queue: usize) -> Box<dyn QueueFilter> {
        Box::new(EncryptQueue {
            xts: Xts::new(&self.key).expect("key checked in Encrypt::new"),
            bounces: BouncePool::new(64),
            view: self.view.clone(),
            cached: self.cached.clone(),
        })
    }

    fn report(&self) {
        if self.view.is_some() {
            tracing::info!(
                reads = self.cached.reads.load(Ordering::Relaxed),
                bytes = self.cached.bytes.load(Ordering::Relaxed),
                "encrypt: reads decrypted straight from the page cache"
            );
        }
    }
}

struct EncryptQueue {
    xts: Xts,
    bounces: BouncePool,
    view: Option<Arc<PageCacheView>>,
    cached: Arc<CachedReads>,
}

impl EncryptQueue {
    /// A read decrypted straight from the page cache: its status, or None
    /// if its pages are not all cached (it then goes to storage).
    fn read_cached(&mut self, req: &mut Request) -> Option<Status> {
        if req.len < CACHED_READ_MIN {
            return None;
        }
        let view = self.view.as_ref()?;
        let first = req.offset / SECTOR as u64;
        let len = usize::try_from(req.len).ok()?;
        let xts = &mut self.xts;
        let iovs = &req.iovs;
        // SAFETY: the view hands the reader `len` readable bytes of the
        // mapping; the iovs are the request's device-writable guest buffers.
        let done = view
            .read(req.offset, len, |src| unsafe {
                decrypt_ptr_into_iovs(xts, first, src, len, iovs)
            })
            .ok()?;
        Some(match done {
            Ok(()) => {
                req.written = len as u32;
                self.cached.reads.fetch_add(1, Ordering::Relaxed);
                self.cached.bytes.fetch_add(req.len, Ordering::Relaxed);
                Status::Ok
            }
            Err(e) => {
                tracing::error!("decrypting a read: {e}");
                Status::IoErr
            }
        })
    }
}

impl QueueFilter for EncryptQueue {
    fn submit(&mut self, req: &mut Request, now: Instant, may_delay: bool) -> Verdict {
        let first = req.offset / SECTOR as u64;
        if !matches!(req.op, Op::Read | Op::Write | Op::WriteZeroes { .. }) {
            return Verdict::Pass;
        }
        if req.op == Op::Read {
            if let Some(status) = self.read_cached(req) {
                return Verdict::Complete(status);
            }
        }
        let mut b = match self.bounces.take(req.len as usize, now, may_delay) {
            Ok(b) => b,
            Err(until) => return Verdict::Delay(until),
        };
        match req.op {
            Op::Write => {
                if let Err(e) = encrypt_from_iovs(&mut self.xts, first, &req.iovs, &mut b) {
                    tracing::error!("encrypting a write: {e}");
                    self.bounces.give_back(b);
                    return Verdict::Complete(Status::IoErr);
                }
                req.bounce = Some(Bounce::new(b));
            }
            Op::WriteZeroes { .. } => {
                b.fill(0);
                if self.xts.encrypt_in_place(first, &mut b).is_err() {
                    self.bounces.give_back(b);
                    return Verdict::Complete(Status::IoErr);
                }
                let mut bounce = Bounce::new(b);
                bounce.replaces = Some(req.op);
                req.bounce = Some(bounce);
                req.op = Op::Write;
            }
            // Storage fills this; the guest sees only what is decrypted.
            _ => req.bounce = Some(Bounce::new(b)),
        }
        Verdict::Pass
    }

    fn complete(&mut self, req: &mut Request, mut status: Status) -> Status {
        let Some(bounce) = req.bounce.take() else {
            return status;
        };
        if let Some(op) = bounce.replaces {
            req.op = op;
        }
        if req.op == Op::Read && status == Status::Ok {
            let first = req.offset / SECTOR as u64;
            if let Err(e) = decrypt_into_iovs(&mut self.xts, first, &bounce.buf, &req.iovs) {
                tracing::error!("decrypting a read: {e}");
                status = Status::IoErr;
            }
        }
        self.bounces.give_back(bounce.buf);
        status
    }
}

/// Walks guest buffers a sector at a time.
struct Cursor<'a> {
    iovs: &'a [Iov],
    i: usize,
    off: usize,
}

impl Cursor<'_> {
    /// The next whole sectors (at most `max`) that lie in one buffer: their
    /// start and count, or None if the next sector straddles buffers.
    fn contiguous(&self, max: usize) -> Option<(*mut u8, usize)> {
        let iov = self.iovs.get(self.i)?;
        let n = ((iov.len() - self.off) / SECTOR).min(max);
        (n > 0).then(|| (iov.skip(self.off).base(), n))
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let left = self.iovs[self.i].len() - self.off;
            let k = left.min(n);
            self.off += k;
            n -= k;
            if self.off == self.iovs[self.i].len() {
                self.i += 1;
                self.off = 0;
            }
        }
    }

    /// Copies the next sector across buffer boundaries (into `tmp`) or from
    /// `tmp` back (with `back`).
    fn copy_sector(&mut self, tmp: &mut [u8; SECTOR], back: bool) {
        let mut done = 0;
        while done < SECTOR {
            let iov = self.iovs[self.i];
            let k = (iov.len() - self.off).min(SECTOR - done);
            // SAFETY: [off, off + k) lies inside this guest buffer, which the
            // request keeps mapped; tmp has room for k bytes at `done`.
            unsafe {
                let p = iov.base().add(self.off);
                if back {
                    std::ptr::copy_nonoverlapping(tmp.as_ptr().add(done), p, k);
                } else {
                    std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr().add(done), k);
                }
            }
            done += k;
            self.advance(k);
        }
    }
}

/// Encrypts the data in `iovs` (whole sectors) into `dst`, handing the
/// engine whole runs of sectors that lie in one guest buffer.
fn encrypt_from_iovs(
    xts: &mut Xts,
    first: u64,
    iovs: &[Iov],
    dst: &mut [u8],
) -> Result<(), XtsError> {
    let mut c = Cursor { iovs, i: 0, off: 0 };
    let mut tmp = [0u8; SECTOR];
    let total = dst.len() / SECTOR;
    let mut done = 0;
    while done < total {
        let out = dst[done * SECTOR..].as_mut_ptr();
        let sector = first + done as u64;
        match c.contiguous(total - done) {
            Some((src, n)) => {
                // SAFETY: src is readable for n sectors (one guest buffer),
                // out is a distinct part of the bounce buffer with room for them.
                unsafe { xts.encrypt_sectors_raw(sector, n, src, out)? };
                c.advance(n * SECTOR);
                done += n;
            }
            None => {
                c.copy_sector(&mut tmp, false);
                // SAFETY: tmp and out are distinct SECTOR-byte buffers.
                unsafe { xts.encrypt_sector_raw(sector, tmp.as_ptr(), out)? };
                done += 1;
            }
        }
    }
    Ok(())
}

/// Decrypts `src` (whole sectors, read from storage) into the guest's
/// buffers `iovs`, handing the engine whole runs of sectors that lie in one
/// guest buffer; a sector split across buffers goes through a local copy.
fn decrypt_into_iovs(xts: &mut Xts, first: u64, src: &[u8], iovs: &[Iov]) -> Result<(), XtsError> {
    // SAFETY: src is readable for its length.
    unsafe { decrypt_ptr_into_iovs(xts, first, src.as_ptr(), src.len(), iovs) }
}

/// [`decrypt_into_iovs`] from `len` bytes at `src`, which may be a shared
/// mapping another process writes (hence no slice).
///
/// # Safety
/// `src` must be readable for `len` bytes and not overlap the iovs.
unsafe fn decrypt_ptr_into_iovs(
    xts: &mut Xts,
    first: u64,
    src: *const u8,
    len: usize,
    iovs: &[Iov],
) -> Result<(), XtsError> {
    let mut c = Cursor { iovs, i: 0, off: 0 };
    let mut tmp = [0u8; SECTOR];
    let total = len / SECTOR;
    let mut done = 0;
    while done < total {
        // SAFETY: done < total, so this stays inside the caller's range.
        let from = unsafe { src.add(done * SECTOR) };
        let sector = first + done as u64;
        match c.contiguous(total - done) {
            Some((dst, n)) => {
                // SAFETY: `from` is readable for n sectors of the bounce
                // buffer; dst is n device-writable sectors of one guest
                // buffer, which the request keeps mapped. They do not overlap.
                unsafe { xts.decrypt_sectors_raw(sector, n, from, dst)? };
                c.advance(n * SECTOR);
                done += n;
            }
            None => {
                // SAFETY: tmp is a distinct SECTOR-byte buffer.
                unsafe { xts.decrypt_sector_raw(sector, from, tmp.as_mut_ptr())? };
                c.copy_sector(&mut tmp, true);
                done += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::bounce::BOUNCE_BUDGET;

    fn iovs_over(buf: &mut [u8], cuts: &[usize]) -> Vec<Iov> {
        let mut v = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&buf.len())) {
            // SAFETY: the test's buffer outlives the iovs.
            v.push(unsafe { Iov::new(buf[start..].as_mut_ptr(), end - start) });
            start = end;
        }
        v
    }

    #[test]
    fn scattered_buffers_encrypt_and_decrypt_like_contiguous_ones() {
        let key = MasterKey::generate();
        let mut xts = Xts::new(&key).unwrap();
        let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut expect = plain.clone();
        xts.encrypt_in_place(99, &mut expect).unwrap();
        // Segments that split sectors at odd places, including a 1-byte one.
        for cuts in [
            vec![],
            vec![512, 1024],
            vec![100, 101, 700, 2000, 4095],
            vec![4000],
        ] {
            let mut src = plain.clone();
            let iovs = iovs_over(&mut src, &cuts);
            let mut out = vec![0u8; 4096];
            encrypt_from_iovs(&mut xts, 99, &iovs, &mut out).unwrap();
            assert_eq!(out, expect, "encrypt, cuts {cuts:?}");
            assert_eq!(src, plain, "guest buffers must not change on a write");
            let mut guest = vec![0u8; 4096];
            let iovs = iovs_over(&mut guest, &cuts);
            decrypt_into_iovs(&mut xts, 99, &expect, &iovs).unwrap();
            assert_eq!(guest, plain, "decrypt, cuts {cuts:?}");
        }
    }

    /// Storage reads into the filter's bounce buffer, never into guest
    /// memory; the guest's buffers receive only plaintext.
    #[test]
    fn reads_never_put_ciphertext_in_guest_memory() {
        let key = MasterKey::generate();
        let f = Encrypt::new(key.clone()).unwrap();
        let mut q = f.queue_filter(0);
        let plain: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
        let mut cipher = plain.clone();
        Xts::new(&key)
            .unwrap()
            .encrypt_in_place(16, &mut cipher)
            .unwrap();
        let mut guest = vec![0xeeu8; 8192];
        let mut req = Request {
            op: Op::Read,
            offset: 16 * SECTOR as u64,
            len: 8192,
            iovs: iovs_over(&mut guest, &[1000, 5000]),
            ..Default::default()
        };
        assert_eq!(q.submit(&mut req, Instant::now(), true), Verdict::Pass);
        // What the worker hands storage: the bounce buffer, not the iovs.
        let bounce = req.bounce.as_mut().expect("a read gets a bounce buffer");
        assert_eq!(bounce.buf.len(), 8192);
        bounce.buf.copy_from_slice(&cipher);
        assert!(guest.iter().all(|&b| b == 0xee), "guest memory untouched");
        assert_eq!(q.complete(&mut req, Status::Ok), Status::Ok);
        assert_eq!(guest, plain);
        assert!(req.bounce.is_none());
        // A failed read leaves the guest's buffers as they were.
        let mut guest = vec![0xeeu8; 4096];
        let mut req = Request {
            op: Op::Read,
            offset: 0,
            len: 4096,
            iovs: iovs_over(&mut guest, &[]),
            ..Default::default()
        };
        q.submit(&mut req, Instant::now(), true);
        req.bounce.as_mut().unwrap().buf.fill(0x55);
        assert_eq!(q.complete(&mut req, Status::IoErr), Status::IoErr);
        assert!(guest.iter().all(|&b| b == 0xee));
    }

    #[test]
    fn bounce_buffers_are_bounded_per_queue() {
        let f = Encrypt::new(MasterKey::generate()).unwrap();
        let mut q = f.queue_filter(0);
        let now = Instant::now();
        let zeroes = |len: u64| Request {
            op: Op::WriteZeroes { unmap: false },
            offset: 0,
            len,
            ..Default::default()
        };
        // A single write larger than the budget still goes.
        let mut big = zeroes(2 * BOUNCE_BUDGET as u64);
        assert_eq!(q.submit(&mut big, now, true), Verdict::Pass);
        // While it is in flight, the next one waits...
        let mut next = zeroes(4096);
        assert!(matches!(q.submit(&mut next, now, true), Verdict::Delay(t) if t > now));
        // ...and goes once the first completed.
        assert_eq!(q.complete(&mut big, Status::Ok), Status::Ok);
        assert_eq!(q.submit(&mut next, now, true), Verdict::Pass);
        // Within the budget, writes go side by side.
        let mut more = zeroes(1 << 20);
        assert_eq!(q.submit(&mut more, now, true), Verdict::Pass);
        // A draining queue is never delayed, and the write is still encrypted.
        let mut huge = zeroes(BOUNCE_BUDGET as u64);
        assert_eq!(q.submit(&mut huge, now, false), Verdict::Pass);
        assert_eq!(huge.op, Op::Write);
        assert!(huge
            .bounce
            .as_ref()
            .is_some_and(|b| b.buf.iter().any(|&x| x != 0)));
    }

    #[test]
    fn write_zeroes_becomes_an_encrypted_write_and_is_restored() {
        let f = Encrypt::new(MasterKey::generate()).unwrap();
        let mut q = f.queue_filter(0);
        let mut req = Request {
            op: Op::WriteZeroes { unmap: true },
            offset: 4096,
            len: 8192,
            ..Default::default()
        };
        assert_eq!(q.submit(&mut req, Instant::now(), true), Verdict::Pass);
        assert_eq!(req.op, Op::Write);
        let b = req.bounce.as_ref().unwrap();
        assert_eq!(b.buf.len(), 8192);
        assert!(b.buf.iter().any(|&x| x != 0));
        assert_eq!(q.complete(&mut req, Status::Ok), Status::Ok);
        assert_eq!(req.op, Op::WriteZeroes { unmap: true });
        assert!(req.bounce.is_none());
    }
}
