//! Memory for key material: its own pages, locked out of swap (`mlock`),
//! left out of core dumps (`MADV_DONTDUMP`), and zeroed before it is
//! unmapped.
//!
//! Locking can fail where `RLIMIT_MEMLOCK` is small; the memory is then
//! still kept out of core dumps and zeroed, and [`lock_failed`] tells the
//! daemon to warn once.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

static LOCK_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether locking key memory ever failed in this process.
pub fn lock_failed() -> bool {
    LOCK_FAILED.load(Ordering::Relaxed)
}

/// Pages of our own holding secrets.
struct Region {
    ptr: NonNull<u8>,
    map_len: usize,
}

// SAFETY: the region is owned memory with no thread affinity.
unsafe impl Send for Region {}
// SAFETY: shared access only reads it.
unsafe impl Sync for Region {}

impl Region {
    /// `len` zeroed bytes (at least one page).
    fn new(len: usize) -> Region {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let map_len = len.max(1).next_multiple_of(page);
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // As the global allocator does when memory runs out.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(map_len, page).expect("page layout"),
            );
        }
        // SAFETY: p is the mapping just made, map_len bytes long.
        unsafe {
            if libc::mlock(p, map_len) != 0 {
                LOCK_FAILED.store(true, Ordering::Relaxed);
            }
            libc::madvise(p, map_len, libc::MADV_DONTDUMP);
        }
        Region {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            map_len,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the region is ours and map_len bytes long; volatile writes
        // so the zeroing is not optimised away before the unmap.
        unsafe {
            let p = self.ptr.as_ptr();
            for i in 0..self.map_len {
                std::ptr::write_volatile(p.add(i), 0);
            }
            libc::munlock(p.cast(), self.map_len);
            libc::munmap(p.cast(), self.map_len);
        }
    }
}

/// Types that are valid when all their bytes are zero and own no other
/// memory (arrays of bytes, SIMD round keys).
///
/// # Safety
/// The all-zero bit pattern must be a valid value, and the type must not
/// need its destructor run (it is never called; the bytes are zeroed).
pub unsafe trait Plain: Sized {}

// SAFETY: byte arrays are valid when zero and have no destructor.
unsafe impl<const N: usize> Plain for [u8; N] {}

/// A `T` living in locked memory of its own.
pub struct Locked<T: Plain> {
    region: Region,
    _t: PhantomData<T>,
}

impl<T: Plain> Locked<T> {
    /// A zeroed `T`; fill it in place with `get_mut`, so no copy of the
    /// secret is left elsewhere.
    pub fn zeroed() -> Self {
        assert!(std::mem::align_of::<T>() <= 4096);
        Locked {
            region: Region::new(std::mem::size_of::<T>()),
            _t: PhantomData,
        }
    }

    pub fn get(&self) -> &T {
        // SAFETY: the region is page-aligned (enough for T), at least
        // size_of::<T>() bytes, and all-zero or written through get_mut: a
        // valid T (Plain).
        unsafe { &*self.region.ptr.as_ptr().cast::<T>() }
    }

    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: as in `get`; &mut self gives exclusive access.
        unsafe { &mut *self.region.ptr.as_ptr().cast::<T>() }
    }
}

impl<T: Plain> Clone for Locked<T> {
    fn clone(&self) -> Self {
        let c = Locked::<T>::zeroed();
        // SAFETY: both regions hold at least size_of::<T>() bytes and are
        // distinct mappings.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.region.ptr.as_ptr(),
                c.region.ptr.as_ptr(),
                std::mem::size_of::<T>(),
            )
        };
        c
    }
}

/// Up to a page-rounded capacity of secret bytes, with a length.
#[derive(Clone)]
pub struct LockedBytes {
    buf: LockedVec,
    len: usize,
}

struct LockedVec {
    region: Region,
}

impl Clone for LockedVec {
    fn clone(&self) -> Self {
        let region = Region::new(self.region.map_len);
        // SAFETY: both regions are map_len bytes (same page rounding) and
        // distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.region.ptr.as_ptr(),
                region.ptr.as_ptr(),
                self.region.map_len,
            )
        };
        LockedVec { region }
    }
}

impl LockedBytes {
    /// A copy of `bytes` in locked memory (the caller zeroes its own copy).
    pub fn from_slice(bytes: &[u8]) -> Self {
        let region = Region::new(bytes.len());
        // SAFETY: the region holds at least bytes.len() bytes and is new.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.ptr.as_ptr(), bytes.len()) };
        LockedBytes {
            buf: LockedVec { region },
            len: bytes.len(),
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len bytes of the region were written in from_slice.
        unsafe { std::slice::from_raw_parts(self.buf.region.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_memory_holds_values_and_is_not_dumped() {
        let mut k = Locked::<[u8; 64]>::zeroed();
        assert_eq!(k.get(), &[0u8; 64]);
        k.get_mut()[3] = 7;
        let c = k.clone();
        assert_eq!(c.get()[3], 7);
        let b = LockedBytes::from_slice(b"secret");
        assert_eq!(b.as_slice(), b"secret");
        assert_eq!(b.clone().as_slice(), b"secret");
        // The mapping is marked for no core dump: /proc/self/smaps shows
        // "dd" in its VmFlags.
        let addr = k.get().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_it = false;
        let mut flags = String::new();
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        in_it = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if in_it && line.starts_with("VmFlags:") {
                flags = line.to_string();
            }
        }
        assert!(flags.contains(" dd"), "{flags}");
        if !lock_failed() {
            assert!(flags.contains(" lo"), "{flags}");
        }
    }
}
