//! AES-256-XTS over 512-byte data units with plain64 tweaks (the tweak is
//! the little-endian sector number), as LUKS1 `aes-xts-plain64` uses.
//!
//! Two engines, chosen at run time. On CPUs with AVX-512 and VAES, our own
//! code ([`vaes`]) runs whole runs of sectors per call, the tweaks of four
//! sectors in one AES pass and eight registers of blocks through the rounds
//! side by side. Elsewhere aws-lc's `EVP_aes_256_xts`, whose hand-tuned code
//! measured 2.0x OpenSSL 3.0 here with 4 KiB data units but only 1.4x with
//! 512-byte ones: per-call overhead dominates at 512 bytes, which LUKS1's
//! plain64 sectors are. Either way, both AES key schedules are expanded once,
//! when an [`Xts`] is made (one per queue).

use std::ptr;

use aws_lc_sys as ffi;

use crate::key::MasterKey;

#[cfg(target_arch = "x86_64")]
mod vaes;

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
    #[error("the cipher failed (aws-lc error {0})")]
    Cipher(u32),
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
    unsafe fn sector(&mut self, sector: u64, src: *const u8, dst: *mut u8) -> Result<(), XtsError> {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        let mut outl = 0;
        // SAFETY: the context was initialised with a key; an IV-only
        // re-initialisation keeps the expanded keys. The caller guarantees
        // the buffers; XTS output is exactly as long as its input.
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                self.0,
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                iv.as_ptr(),
                -1,
            ) == 1
                && ffi::EVP_CipherUpdate(self.0, dst, &mut outl, src, SECTOR as i32) == 1
        };
        if !ok || outl as usize != SECTOR {
            // SAFETY: reads the thread's aws-lc error queue.
            return Err(XtsError::Cipher(unsafe { ffi::ERR_get_error() }));
        }
        Ok(())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context is owned and freed once; freeing also cleanses
        // the key schedules it holds.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0) };
    }
}

/// The implementation behind an [`Xts`].
enum Engine {
    /// Our VAES/AVX-512 code: whole runs of sectors per call.
    #[cfg(target_arch = "x86_64")]
    Vaes(crate::locked::Locked<vaes::VaesXts>),
    /// aws-lc's EVP interface: one call per sector.
    AwsLc { enc: Ctx, dec: Ctx },
}

/// An AES-256-XTS engine for one user (one queue): not shared across threads.
pub struct Xts {
    engine: Engine,
}

/// The engine [`Xts::new`] picks on this CPU: "vaes-avx512" or "aws-lc".
pub fn engine_for_this_cpu() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if vaes::available() && std::env::var("VMCRYPT_XTS").map_or(true, |v| v != "aws-lc") {
        return "vaes-avx512";
    }
    "aws-lc"
}

impl Xts {
    /// The fastest engine this CPU runs: VAES/AVX-512 where available, else
    /// aws-lc. `VMCRYPT_XTS=aws-lc` forces the latter.
    pub fn new(key: &MasterKey) -> Result<Self, XtsError> {
        #[cfg(target_arch = "x86_64")]
        if vaes::available() && std::env::var("VMCRYPT_XTS").map_or(true, |v| v != "aws-lc") {
            if key.as_bytes()[..32] == key.as_bytes()[32..] {
                return Err(XtsError::DuplicatedKeys);
            }
            let mut keys = crate::locked::Locked::<vaes::VaesXts>::zeroed();
            keys.get_mut().init(key.as_bytes());
            return Ok(Xts {
                engine: Engine::Vaes(keys),
            });
        }
        Self::new_aws_lc(key)
    }

    /// The aws-lc engine, whatever the CPU.
    pub fn new_aws_lc(key: &MasterKey) -> Result<Self, XtsError> {
        Ok(Xts {
            engine: Engine::AwsLc {
                enc: Ctx::new(key, true)?,
                dec: Ctx::new(key, false)?,
            },
        })
    }

    /// Which engine runs: "vaes-avx512" or "aws-lc".
    pub fn engine(&self) -> &'static str {
        match self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes(_) => "vaes-avx512",
            Engine::AwsLc { .. } => "aws-lc",
        }
    }

    /// Encrypts (or decrypts) `n` sectors between raw buffers.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `n * 512` bytes, equal or disjoint.
    unsafe fn run(
        &mut self,
        encrypt: bool,
        first: u64,
        n: usize,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<(), XtsError> {
        match &mut self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes(v) => {
                // SAFETY: forwarded from the caller.
                unsafe { v.get().run(encrypt, first, n, src, dst) };
                Ok(())
            }
            Engine::AwsLc { enc, dec } => {
                let ctx = if encrypt { enc } else { dec };
                for i in 0..n {
                    // SAFETY: sector i lies inside both buffers (caller's contract).
                    unsafe {
                        ctx.sector(
                            first.wrapping_add(i as u64),
                            src.add(i * SECTOR),
                            dst.add(i * SECTOR),
                        )?
                    };
                }
                Ok(())
            }
        }
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
        // SAFETY: both slices hold len bytes and are distinct borrows.
        unsafe {
            self.run(
                true,
                first,
                src.len() / SECTOR,
                src.as_ptr(),
                dst.as_mut_ptr(),
            )
        }
    }

    /// Encrypts whole sectors in place.
    pub fn encrypt_in_place(&mut self, first: u64, buf: &mut [u8]) -> Result<(), XtsError> {
        check(buf.len())?;
        let p = buf.as_mut_ptr();
        // SAFETY: in place over len bytes.
        unsafe { self.run(true, first, buf.len() / SECTOR, p, p) }
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt_in_place(&mut self, first: u64, buf: &mut [u8]) -> Result<(), XtsError> {
        check(buf.len())?;
        let p = buf.as_mut_ptr();
        // SAFETY: in place over len bytes.
        unsafe { self.run(false, first, buf.len() / SECTOR, p, p) }
    }

    /// Encrypts `n` sectors between raw buffers (guest memory).
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `n * 512` bytes, equal or disjoint.
    pub unsafe fn encrypt_sectors_raw(
        &mut self,
        first: u64,
        n: usize,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<(), XtsError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.run(true, first, n, src, dst) }
    }

    /// Decrypts `n` sectors between raw buffers (guest memory).
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `n * 512` bytes, equal or disjoint.
    pub unsafe fn decrypt_sectors_raw(
        &mut self,
        first: u64,
        n: usize,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<(), XtsError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.run(false, first, n, src, dst) }
    }

    /// Encrypts one sector between raw buffers.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for 512 bytes, equal or disjoint.
    pub unsafe fn encrypt_sector_raw(
        &mut self,
        sector: u64,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<(), XtsError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.run(true, sector, 1, src, dst) }
    }

    /// Decrypts one sector between raw buffers.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for 512 bytes, equal or disjoint.
    pub unsafe fn decrypt_sector_raw(
        &mut self,
        sector: u64,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<(), XtsError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.run(false, sector, 1, src, dst) }
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
