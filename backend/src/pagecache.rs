//! Encrypted reads straight from the host's page cache.
//!
//! An encrypted read through io_uring costs two passes over the data: the
//! kernel copies the cached ciphertext into a bounce buffer, then the
//! `encrypt` filter decrypts it into the guest's buffers. With the image
//! also mapped read-only into the daemon, a read whose pages are all in the
//! page cache is decrypted from the mapping into the guest's buffers in one
//! pass, with no system call but `mincore`. Reads whose pages are not all
//! cached still go to io_uring, so a queue never waits for the disk in a
//! page fault.
//!
//! What can go wrong with a mapping, and what is done about it:
//! - **A page is dropped after `mincore` saw it and the disk then fails, or
//!   the file is truncated behind the daemon's back** (the image lock is
//!   advisory): touching the page raises SIGBUS. The handler here recognises
//!   a fault inside a read this module guards, maps a zero page over the
//!   faulting page so the copy can finish, and flags the read. The read then
//!   goes to io_uring as if the pages had not been cached (which reports the
//!   real error, if any), and the view is not used again. A SIGBUS anywhere
//!   else keeps its default action.
//! - **Stale pages after another host wrote the image**: the hand-over drops
//!   the image's page cache at device start; [`PageCacheView::forget`] first
//!   unmaps the view's pages so that they can be dropped.
//! - **Core dumps** leave the mapping out (`MADV_DONTDUMP`).
//! - **Growing the disk**: the view covers the image as it was opened; reads
//!   past that go to io_uring.
//!
//! Not used with `--cache none` (that keeps the page cache out entirely),
//! nor for RBD images. `mincore` reports page-cache residency only to a
//! process that may write the file (Linux 5.0+); for an image this daemon
//! may only read, pages it has not mapped yet look absent, and such reads
//! simply take the io_uring path.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Largest read checked with one `mincore` call (its vector lives on the stack).
const CHECK_PAGES: usize = 256;

/// A read-only shared mapping of an image file's data area.
#[derive(Debug)]
pub struct PageCacheView {
    base: NonNull<u8>,
    /// Bytes mapped, from the start of the file.
    mapped: usize,
    /// Where the disk starts in the file.
    data_offset: u64,
    /// A read through the view faulted: it is not used again.
    damaged: AtomicBool,
}

// SAFETY: the mapping is read-only and process-wide; the view hands out
// only raw reads of it, guarded against faults, from any thread.
unsafe impl Send for PageCacheView {}
// SAFETY: as above; `damaged` is atomic.
unsafe impl Sync for PageCacheView {}

/// A read that [`PageCacheView::read`] could not complete from the mapping.
#[derive(Debug, PartialEq, Eq)]
pub enum Missed {
    /// A page was not in the page cache (or the range is outside the view).
    NotCached,
    /// Touching the mapping faulted (SIGBUS): the view is no longer used.
    Faulted,
}

impl PageCacheView {
    /// Maps the first `file_len` bytes of `file`, whose disk starts
    /// `data_offset` bytes in.
    pub fn map(file: &File, file_len: u64, data_offset: u64) -> io::Result<Self> {
        install_sigbus_handler()?;
        let mapped = usize::try_from(file_len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image too large to map"))?;
        if mapped == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty image"));
        }
        // SAFETY: a new read-only shared mapping of a valid descriptor; the
        // kernel picks the address, so nothing existing is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just made; DONTDUMP keeps the image
        // out of core dumps, RANDOM stops readahead on faults (reads are
        // only taken from here when their pages are already cached).
        unsafe {
            libc::madvise(p, mapped, libc::MADV_DONTDUMP);
            libc::madvise(p, mapped, libc::MADV_RANDOM);
        }
        Ok(PageCacheView {
            base: NonNull::new(p.cast()).expect("mmap does not return null on success"),
            mapped,
            data_offset,
            damaged: AtomicBool::new(false),
        })
    }

    /// Runs `f` over the disk bytes `[offset, offset + len)`, straight from
    /// the page cache, if every page of them is cached now. `f` gets the
    /// address of the first byte; it must only read `len` bytes from it.
    pub fn read<T>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(*const u8) -> T,
    ) -> Result<T, Missed> {
        let (start, end) = self.range(offset, len).ok_or(Missed::NotCached)?;
        if self.damaged.load(Ordering::Relaxed) || !self.cached(start, end) {
            return Err(Missed::NotCached);
        }
        // SAFETY: [start, end) lies inside the mapping (checked by `range`).
        let p = unsafe { self.base.as_ptr().add(start) };
        let read = guarded(p as usize, end - start, || f(p));
        // A fault on another thread may have put a zero page where this
        // read was reading (without a fault of its own): what it read may
        // be zeroes, not the image.
        let read = read.filter(|_| !zero_patched(p as usize, end - start));
        match read {
            Some(v) => Ok(v),
            None => {
                if !self.damaged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        offset,
                        len,
                        "reading the image from the page cache faulted (image truncated, or a \
                         disk error?): reads go through io_uring from now on"
                    );
                }
                Err(Missed::Faulted)
            }
        }
    }

    /// Unmaps every page of the view from this process (they stay in the
    /// page cache), so that dropping the image's cache can drop them too.
    /// Only while no queue reads through the view.
    pub fn forget(&self) {
        // SAFETY: the range is exactly this view's mapping; MADV_DONTNEED on
        // a shared file mapping only drops page-table entries.
        let rc =
            unsafe { libc::madvise(self.base.as_ptr().cast(), self.mapped, libc::MADV_DONTNEED) };
        if rc != 0 {
            tracing::debug!(
                "unmapping the page-cache view: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// The byte range of the mapping holding disk bytes `[offset, offset + len)`.
    fn range(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let start = usize::try_from(self.data_offset.checked_add(offset)?).ok()?;
        let end = start.checked_add(len)?;
        (len > 0 && end <= self.mapped).then_some((start, end))
    }

    /// Whether every page of mapping bytes `[start, end)` is in the page cache.
    fn cached(&self, start: usize, end: usize) -> bool {
        let page = page_size();
        let mut vec = [0u8; CHECK_PAGES];
        let mut at = start & !(page - 1);
        while at < end {
            let pages = (end - at).div_ceil(page).min(CHECK_PAGES);
            // SAFETY: `at` is page-aligned inside the mapping and `pages`
            // pages from it stay inside it (the mapping's length rounds up
            // to whole pages); the vector has room for `pages` entries.
            let rc = unsafe {
                libc::mincore(
                    self.base.as_ptr().add(at).cast(),
                    pages * page,
                    vec.as_mut_ptr(),
                )
            };
            if rc != 0 || vec[..pages].iter().any(|&b| b & 1 == 0) {
                return false;
            }
            at += pages * page;
        }
        true
    }
}

impl Drop for PageCacheView {
    fn drop(&mut self) {
        // Its addresses may be mapped again for something else.
        let (base, end) = (
            self.base.as_ptr() as usize,
            self.base.as_ptr() as usize + self.mapped,
        );
        for slot in &PATCHED {
            let _ = slot.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                (a >= base && a < end).then_some(0)
            });
        }
        // SAFETY: this view's own mapping, which nothing uses any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}

/// The page size, read once (before any guarded read, so the SIGBUS
/// handler only ever loads it).
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf with a valid name has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).unwrap_or(4096)
    })
}

thread_local! {
    /// The mapping range this thread is reading under guard (start, len),
    /// and whether a fault hit it. Const-initialised plain cells: safe to
    /// touch from the signal handler.
    static GUARD: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    static FAULTED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, which reads mapping bytes `[start, start + len)`; None if a
/// SIGBUS hit that range meanwhile (the faulting pages then read as zeroes).
fn guarded<T>(start: usize, len: usize, f: impl FnOnce() -> T) -> Option<T> {
    FAULTED.with(|c| c.set(false));
    GUARD.with(|g| g.set((start, len)));
    let v = f();
    GUARD.with(|g| g.set((0, 0)));
    (!FAULTED.with(|c| c.replace(false))).then_some(v)
}

/// The pages the SIGBUS handler replaced with a zero page (their
/// addresses, recorded before the page is replaced), and how many there
/// were. A read that was under way on another thread may have read such a
/// page without a fault of its own: it is taken as faulted too.
const PATCH_SLOTS: usize = 64;
static PATCHED: [AtomicUsize; PATCH_SLOTS] = [const { AtomicUsize::new(0) }; PATCH_SLOTS];
static PATCH_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Whether a zero page was put anywhere in mapping bytes `[start, start +
/// len)` (or more pages were patched than recorded).
fn zero_patched(start: usize, len: usize) -> bool {
    let n = PATCH_COUNT.load(Ordering::SeqCst);
    if n == 0 {
        return false;
    }
    if n > PATCH_SLOTS {
        return true;
    }
    let first = start & !(page_size() - 1);
    PATCHED[..n].iter().any(|a| {
        let a = a.load(Ordering::SeqCst);
        a >= first && a < start + len
    })
}

/// The SIGBUS handler's installation: done once, its failure (an errno)
/// remembered so that no later view maps without it.
static SIGBUS: OnceLock<Option<i32>> = OnceLock::new();

fn install_sigbus_handler() -> io::Result<()> {
    // The handler only touches const-initialised thread-locals and makes
    // async-signal-safe system calls.
    let failed = SIGBUS.get_or_init(|| {
        crate::sys::install_siginfo_handler(libc::SIGBUS, on_sigbus)
            .err()
            .map(|e| e.raw_os_error().unwrap_or(libc::EINVAL))
    });
    match failed {
        None => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, len) = GUARD.with(|g| g.get());
    if len > 0 && addr >= start && addr < start + len {
        let page = page_size();
        let at = addr & !(page - 1);
        let i = PATCH_COUNT.fetch_add(1, Ordering::SeqCst);
        if let Some(slot) = PATCHED.get(i) {
            slot.store(at, Ordering::SeqCst);
        }
        // SAFETY: replaces one page of this thread's guarded range, inside
        // the view's read-only mapping, with a private zero page, so that
        // the faulting read can go on; the view is not used again.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTED.with(|c| c.set(true));
            return;
        }
    }
    // Not a guarded read (or it could not be patched): the default action,
    // taken when the faulting instruction runs again.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(bytes: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..bytes).map(|i| (i * 31 + 7) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.as_file().sync_all().unwrap();
        (f, data)
    }

    fn copy(view: &PageCacheView, offset: u64, len: usize) -> Result<Vec<u8>, Missed> {
        view.read(offset, len, |p| {
            let mut out = vec![0u8; len];
            // SAFETY: the view hands out `len` readable bytes at p.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
            out
        })
    }

    #[test]
    fn cached_reads_come_from_the_mapping_at_the_data_offset() {
        let (f, data) = image(64 << 10);
        let view = PageCacheView::map(f.as_file(), data.len() as u64, 8192).unwrap();
        // Just written: in the page cache.
        assert_eq!(
            copy(&view, 512, 4096).unwrap(),
            &data[8192 + 512..8192 + 4608]
        );
        assert_eq!(copy(&view, 0, 56 << 10).unwrap(), &data[8192..]);
        // Past the end, or empty: not from here.
        assert_eq!(copy(&view, 56 << 10, 512), Err(Missed::NotCached));
        assert_eq!(copy(&view, 1 << 20, 512), Err(Missed::NotCached));
        assert_eq!(copy(&view, u64::MAX - 10, 512), Err(Missed::NotCached));
        // forget() keeps the data reachable.
        view.forget();
        assert_eq!(copy(&view, 0, 4096).unwrap(), &data[8192..8192 + 4096]);
    }

    #[test]
    fn pages_not_in_the_page_cache_are_not_read_from_the_mapping() {
        let (f, data) = image(1 << 20);
        let view = PageCacheView::map(f.as_file(), data.len() as u64, 0).unwrap();
        // SAFETY: fadvise on a valid descriptor; the file is clean (synced).
        let rc = unsafe {
            libc::posix_fadvise(f.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(rc, 0);
        let mut called = false;
        let r = view.read(0, 1 << 20, |_| called = true);
        // tmpfs cannot drop pages; there the read is (rightly) served.
        if r == Err(Missed::NotCached) {
            assert!(!called, "a miss never runs the reader");
        }
    }

    /// The hand-over drops the image's page cache at device start: pages the
    /// view has mapped must go too, or a read would see what this host
    /// cached before another host wrote.
    #[test]
    fn forget_lets_the_page_cache_drop_mapped_pages() {
        let (f, data) = image(256 << 10);
        let view = PageCacheView::map(f.as_file(), data.len() as u64, 0).unwrap();
        assert_eq!(copy(&view, 0, 256 << 10).unwrap(), data); // now mapped
        let drop_cache = || {
            // SAFETY: fadvise on a valid descriptor; the file is clean.
            unsafe { libc::posix_fadvise(f.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }
        };
        assert_eq!(drop_cache(), 0);
        let mapped_pages_stay = copy(&view, 0, 4096).is_ok();
        view.forget();
        assert_eq!(drop_cache(), 0);
        if copy(&view, 0, 4096).is_ok() {
            // tmpfs keeps every page: nothing to show there.
            return;
        }
        assert!(
            mapped_pages_stay,
            "pages this process maps survive a drop..."
        );
        assert_eq!(
            copy(&view, 0, 256 << 10),
            Err(Missed::NotCached),
            "...until forgotten"
        );
    }

    /// The image shrinks behind the daemon's back while a read is under way:
    /// the read is flagged, the daemon lives, the view is retired.
    #[test]
    fn a_fault_in_a_guarded_read_is_reported_not_fatal() {
        let (f, data) = image(64 << 10);
        let view = PageCacheView::map(f.as_file(), data.len() as u64, 0).unwrap();
        let r = view.read(0, 64 << 10, |p| {
            f.as_file().set_len(0).unwrap();
            let mut sum = 0u64;
            for i in (0..64 << 10).step_by(4096) {
                // SAFETY: inside the guarded range; volatile so the reads
                // happen after the truncation.
                sum += u64::from(unsafe { std::ptr::read_volatile(p.add(i)) });
            }
            sum
        });
        assert_eq!(r, Err(Missed::Faulted));
        assert_eq!(copy(&view, 0, 4096), Err(Missed::NotCached), "retired");
    }

    /// Two queues read the same page; the image shrinks and one of them
    /// faults, which puts a zero page there. The other, whose read was
    /// under way, reads that zero page without a fault: its read is
    /// reported as faulted too, never as the image's data.
    #[test]
    fn a_read_under_way_when_another_faults_is_not_taken() {
        let (f, data) = image(64 << 10);
        let view = PageCacheView::map(f.as_file(), data.len() as u64, 0).unwrap();
        let inside = std::sync::Barrier::new(2);
        let faulted = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let other = s.spawn(|| {
                view.read(0, 4096, |p| {
                    inside.wait();
                    faulted.wait();
                    // SAFETY: inside the guarded range.
                    unsafe { std::ptr::read_volatile(p) }
                })
            });
            let r = view.read(0, 4096, |p| {
                inside.wait();
                f.as_file().set_len(0).unwrap();
                // SAFETY: inside the guarded range.
                unsafe { std::ptr::read_volatile(p) }
            });
            assert_eq!(r, Err(Missed::Faulted));
            faulted.wait();
            assert_eq!(other.join().unwrap(), Err(Missed::Faulted));
        });
    }
}
