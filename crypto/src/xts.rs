//! AES-256-XTS over 512-byte data units with plain64 tweaks (the tweak is
//! the little-endian sector number), as LUKS1 `aes-xts-plain64` uses.
//!
//! The engine wraps aws-lc's `EVP_aes_256_xts`: its hand-tuned VAES/AVX-512
//! code measured 2.0x OpenSSL 3.0 here with 4 KiB data units and 1.4x with
//! 512-byte ones, where a batched XTS on the `aes` crate reached 0.8-1.5x.
//! Both AES key schedules are expanded once, when an [`Xts`] is made (one
//! per queue); each sector then only sets its tweak and runs the cipher.

use std::ptr;

use aws_lc_sys as ffi;

use crate::key::MasterKey;

/// Bytes in a data unit (sector).
pub const SECTOR: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum XtsError {
    #[error("the two halves of the XTS key are equal")]
    DuplicatedKeys,
    #[error("cannot set up the cipher (aws-lc error {0})")]
    Init(u32),
    #[error("data length {0} is not a whole number of 512-byte sectors")]
    Length(usize),
}

/// One direction of the cipher with its expanded keys.
struct Ctx(*mut ffi::EVP_CIPHER_CTX);

// SAFETY: the context is owned by this value and only used through &mut self.
unsafe impl Send for Ctx {}

impl Ctx {
    fn new(key: &MasterKey, encrypt: bool) -> Result<Self, XtsError> {
        if key.as_bytes()[..32] == key.as_bytes()[32..] {
            return Err(XtsError::DuplicatedKeys);
        }
        // SAFETY: EVP_CIPHER_CTX_new returns an owned context or null.
        let ctx = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            // SAFETY: reads the thread's aws-lc error queue.
            return Err(XtsError::Init(unsafe { ffi::ERR_get_error() }));
        }
        let ctx = Ctx(ctx);
        // SAFETY: ctx is valid; the key is 64 bytes as AES-256-XTS needs; a
        // null IV is allowed here (it is set per sector).
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0,
                ffi::EVP_aes_256_xts(),
                ptr::null_mut(),
                key.as_bytes().as_ptr(),
                ptr::null(),
                i32::from(encrypt),
            )
        };
        if ok != 1 {
            // SAFETY: reads the thread's aws-lc error queue.
            return Err(XtsError::Init(unsafe { ffi::ERR_get_error() }));
        }
        Ok(ctx)
    }

    /// Runs the cipher over one sector from `src` to `dst` (which may be equal).
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for `SECTOR` bytes, and the
    /// two must either be the same address or not overlap.
    unsafe fn sector(&mut self, sector: u64, src: *const u8, dst: *mut u8) {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        let mut outl = 0;
        // SAFETY: the context was initialised with a key; an IV-only
        // re-initialisation keeps the expanded keys. The caller guarantees
        // the buffers; XTS output is exactly as long as its input.
        unsafe {
            ffi::EVP_CipherInit_ex(
                self.0,
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                iv.as_ptr(),
                -1,
            );
            ffi::EVP_CipherUpdate(self.0, dst, &mut outl, src, SECTOR as i32);
        }
        debug_assert_eq!(outl as usize, SECTOR);
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context is owned and freed once; freeing also cleanses
        // the key schedules it holds.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0) };
    }
}

/// An AES-256-XTS engine for one user (one queue): not shared across threads.
pub struct Xts {
    enc: Ctx,
    dec: Ctx,
}

impl Xts {
    pub fn new(key: &MasterKey) -> Result<Self, XtsError> {
        Ok(Xts {
            enc: Ctx::new(key, true)?,
            dec: Ctx::new(key, false)?,
        })
    }

    /// Encrypts whole sectors from `src` into `dst`; `first` is the sector
    /// number (tweak) of the first one.
    pub fn encrypt(&mut self, first: u64, src: &[u8], dst: &mut [u8]) -> Result<(), XtsError> {
        check(src.len())?;
        assert_eq!(
            src.len(),
            dst.len(),
            "source and destination differ in length"
        );
        for (i, (s, d)) in src
            .chunks_exact(SECTOR)
            .zip(dst.chunks_exact_mut(SECTOR))
            .enumerate()
        {
            // SAFETY: both chunks are SECTOR bytes and distinct borrows.
            unsafe {
                self.enc
                    .sector(first.wrapping_add(i as u64), s.as_ptr(), d.as_mut_ptr())
            };
        }
        Ok(())
    }

    /// Encrypts whole sectors in place.
    pub fn encrypt_in_place(&mut self, first: u64, buf: &mut [u8]) -> Result<(), XtsError> {
        check(buf.len())?;
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            // SAFETY: the chunk is SECTOR bytes; in-place operation is allowed.
            unsafe {
                self.enc
                    .sector(first.wrapping_add(i as u64), s.as_ptr(), s.as_mut_ptr())
            };
        }
        Ok(())
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt_in_place(&mut self, first: u64, buf: &mut [u8]) -> Result<(), XtsError> {
        check(buf.len())?;
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            // SAFETY: the chunk is SECTOR bytes; in-place operation is allowed.
            unsafe {
                self.dec
                    .sector(first.wrapping_add(i as u64), s.as_ptr(), s.as_mut_ptr())
            };
        }
        Ok(())
    }

    /// Encrypts one sector between raw buffers (guest memory).
    ///
    /// # Safety
    /// `src` readable and `dst` writable for 512 bytes, equal or disjoint.
    pub unsafe fn encrypt_sector_raw(&mut self, sector: u64, src: *const u8, dst: *mut u8) {
        // SAFETY: forwarded from the caller.
        unsafe { self.enc.sector(sector, src, dst) }
    }

    /// Decrypts one sector between raw buffers (guest memory).
    ///
    /// # Safety
    /// `src` readable and `dst` writable for 512 bytes, equal or disjoint.
    pub unsafe fn decrypt_sector_raw(&mut self, sector: u64, src: *const u8, dst: *mut u8) {
        // SAFETY: forwarded from the caller.
        unsafe { self.dec.sector(sector, src, dst) }
    }
}

fn check(len: usize) -> Result<(), XtsError> {
    if !len.is_multiple_of(SECTOR) {
        Err(XtsError::Length(len))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
