//! AES-256-XTS with VAES on 512-bit registers (AVX-512F + VAES + AES-NI),
//! for runs of 512-byte sectors with plain64 tweaks.
//!
//! A sector is 32 blocks = 8 registers of 4 blocks. Its first tweak is
//! E_k2(sector), computed for up to four sectors in one register; the 32
//! tweaks follow by multiplying by alpha^4 per register (a 4-bit shift in
//! GF(2^128) with the 0x87 reduction done by shifts). The 8 registers go
//! through the 14 rounds side by side, which keeps the AES units busy.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

/// How far ahead of the sector being ciphered its source is prefetched.
/// Hardware prefetchers stop at 4 KiB page boundaries, and the pages of a
/// request (guest memory, a page-cache mapping) are seldom adjacent in
/// physical memory, so each page would start with a wait for DRAM. Asking
/// for the lines one page ahead keeps the next page on its way while this
/// one is ciphered: 128 KiB runs from a 64 MiB source went from 13.4-14.2 to
/// 17.1-17.5 GB/s on a Zen 5 core, the same as from cache (2 KiB ahead:
/// 14.5; 8 KiB: 17.6-17.8, but then more is fetched past small requests).
const PREFETCH_AHEAD: usize = 4096;

/// Round keys: encryption with key 1 and key 2, decryption with key 1.
pub struct VaesXts {
    ek1: [__m512i; 15],
    dk1: [__m512i; 15],
    ek2: [__m512i; 15],
}

// SAFETY: plain key material in SIMD registers' layout, no pointers.
unsafe impl Send for VaesXts {}

// SAFETY: all-zero vectors are valid round keys (of no key), and the type
// owns no memory; it lives in `Locked`, which zeroes it on drop.
unsafe impl crate::locked::Plain for VaesXts {}

/// Zeroes round keys left in a local array.
fn wipe<T: Copy>(a: &mut [T], zero: T) {
    for x in a.iter_mut() {
        // SAFETY: a valid &mut; volatile so the write is kept.
        unsafe { std::ptr::write_volatile(x, zero) };
    }
}

/// Whether this CPU can run this engine.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("aes")
}

macro_rules! assist1 {
    ($t1:ident, $t2:ident) => {{
        $t2 = _mm_shuffle_epi32($t2, 0xff);
        let mut t4 = _mm_slli_si128($t1, 4);
        $t1 = _mm_xor_si128($t1, t4);
        t4 = _mm_slli_si128(t4, 4);
        $t1 = _mm_xor_si128($t1, t4);
        t4 = _mm_slli_si128(t4, 4);
        $t1 = _mm_xor_si128($t1, t4);
        $t1 = _mm_xor_si128($t1, $t2);
    }};
}

macro_rules! assist2 {
    ($t1:ident, $t3:ident) => {{
        let t2 = _mm_shuffle_epi32(_mm_aeskeygenassist_si128($t1, 0x00), 0xaa);
        let mut t4 = _mm_slli_si128($t3, 4);
        $t3 = _mm_xor_si128($t3, t4);
        t4 = _mm_slli_si128(t4, 4);
        $t3 = _mm_xor_si128($t3, t4);
        t4 = _mm_slli_si128(t4, 4);
        $t3 = _mm_xor_si128($t3, t4);
        $t3 = _mm_xor_si128($t3, t2);
    }};
}

macro_rules! round_pair {
    ($ks:ident, $i:expr, $rcon:expr, $t1:ident, $t2:ident, $t3:ident) => {{
        $t2 = _mm_aeskeygenassist_si128($t3, $rcon);
        assist1!($t1, $t2);
        $ks[$i] = $t1;
        assist2!($t1, $t3);
        $ks[$i + 1] = $t3;
    }};
}

/// The AES-256 encryption key schedule.
#[target_feature(enable = "aes,sse2")]
unsafe fn expand(key: &[u8; 32]) -> [__m128i; 15] {
    let mut ks = [_mm_setzero_si128(); 15];
    // SAFETY: unaligned 16-byte loads from a 32-byte array.
    let (mut t1, mut t3) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    let mut t2;
    ks[0] = t1;
    ks[1] = t3;
    round_pair!(ks, 2, 0x01, t1, t2, t3);
    round_pair!(ks, 4, 0x02, t1, t2, t3);
    round_pair!(ks, 6, 0x04, t1, t2, t3);
    round_pair!(ks, 8, 0x08, t1, t2, t3);
    round_pair!(ks, 10, 0x10, t1, t2, t3);
    round_pair!(ks, 12, 0x20, t1, t2, t3);
    t2 = _mm_aeskeygenassist_si128(t3, 0x40);
    assist1!(t1, t2);
    ks[14] = t1;
    ks
}

#[target_feature(enable = "avx512f")]
unsafe fn broadcast(ks: &[__m128i; 15]) -> [__m512i; 15] {
    let mut out = [_mm512_setzero_si512(); 15];
    for i in 0..15 {
        out[i] = _mm512_broadcast_i32x4(ks[i]);
    }
    out
}

/// Multiplies each 128-bit lane by alpha^4 in GF(2^128).
#[inline]
#[target_feature(enable = "avx512f")]
fn mul_alpha4(t: __m512i) -> __m512i {
    let shifted = _mm512_slli_epi64(t, 4);
    let carry = _mm512_srli_epi64(t, 60);
    let zero = _mm512_setzero_si512();
    // The low qword's top bits move into the high qword: [0, carry.lo].
    let into_high = _mm512_unpacklo_epi64(zero, carry);
    // The high qword's top bits (x^128..x^131) reduce by x^7 + x^2 + x + 1:
    // [carry.hi, 0].
    let c = _mm512_unpackhi_epi64(carry, zero);
    let red = _mm512_xor_si512(
        _mm512_xor_si512(c, _mm512_slli_epi64(c, 1)),
        _mm512_xor_si512(_mm512_slli_epi64(c, 2), _mm512_slli_epi64(c, 7)),
    );
    _mm512_xor_si512(_mm512_xor_si512(shifted, into_high), red)
}

/// Asks for the eight cache lines of a sector. A prefetch is a hint that
/// never faults, and callers only pass addresses inside their buffers.
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_sector(p: *const u8) {
    for line in 0..8 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line).cast());
    }
}

/// T, T*a, T*a^2, T*a^3 in one register, from T in a 128-bit lane.
#[inline]
fn first_four(t: u128) -> [u128; 4] {
    let dbl = |x: u128| (x << 1) ^ (((x as i128) >> 127) as u128 & 0x87);
    let t1 = dbl(t);
    let t2 = dbl(t1);
    [t, t1, t2, dbl(t2)]
}

impl VaesXts {
    /// Expands the keys into `self` (in place, so the round keys are not
    /// copied around). The caller checks [`available`] first.
    pub fn init(&mut self, key: &[u8; 64]) {
        assert!(available(), "VAES XTS needs AVX-512F, VAES and AES-NI");
        let k1: &[u8; 32] = key[..32].try_into().unwrap();
        let k2: &[u8; 32] = key[32..].try_into().unwrap();
        // SAFETY: the CPU features were checked above.
        unsafe {
            let mut e1 = expand(k1);
            let mut e2 = expand(k2);
            let mut d1 = [_mm_setzero_si128(); 15];
            d1[0] = e1[14];
            for i in 1..14 {
                d1[i] = _mm_aesimc_si128(e1[14 - i]);
            }
            d1[14] = e1[0];
            self.ek1 = broadcast(&e1);
            self.dk1 = broadcast(&d1);
            self.ek2 = broadcast(&e2);
            let z = _mm_setzero_si128();
            wipe(&mut e1, z);
            wipe(&mut e2, z);
            wipe(&mut d1, z);
        }
    }

    /// Encrypts (or decrypts) `n` consecutive sectors from `src` to `dst`
    /// (equal, or not overlapping); `first` is the first sector number.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `n * 512` bytes.
    pub unsafe fn run(&self, encrypt: bool, first: u64, n: usize, src: *const u8, dst: *mut u8) {
        // SAFETY: features checked when the engine was made; buffers by the caller.
        unsafe { self.run_inner(encrypt, first, n, src, dst) }
    }

    #[target_feature(enable = "avx512f,vaes,aes")]
    unsafe fn run_inner(&self, encrypt: bool, first: u64, n: usize, src: *const u8, dst: *mut u8) {
        let mut done = 0;
        while done < n {
            let batch = (n - done).min(4);
            // E_k2(sector) for up to four sectors at once.
            let mut sec = [0u64; 8];
            for i in 0..batch {
                sec[2 * i] = first.wrapping_add((done + i) as u64);
            }
            // SAFETY: reading 64 bytes from an 8-qword array.
            let mut t = unsafe { _mm512_loadu_si512(sec.as_ptr().cast()) };
            t = _mm512_xor_si512(t, self.ek2[0]);
            for r in 1..14 {
                t = _mm512_aesenc_epi128(t, self.ek2[r]);
            }
            t = _mm512_aesenclast_epi128(t, self.ek2[14]);
            let mut tweaks = [0u128; 4];
            // SAFETY: storing 64 bytes into a 4 x u128 array.
            unsafe { _mm512_storeu_si512(tweaks.as_mut_ptr().cast(), t) };
            for i in 0..batch {
                let off = (done + i) * 512;
                if off + PREFETCH_AHEAD < n * 512 {
                    prefetch_sector(src.wrapping_add(off + PREFETCH_AHEAD));
                }
                // SAFETY: the sector [off, off + 512) is inside both buffers.
                unsafe {
                    if encrypt {
                        self.sector::<true>(tweaks[i], src.add(off), dst.add(off))
                    } else {
                        self.sector::<false>(tweaks[i], src.add(off), dst.add(off))
                    }
                };
            }
            done += batch;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,vaes,aes")]
    unsafe fn sector<const ENCRYPT: bool>(&self, t0: u128, src: *const u8, dst: *mut u8) {
        let encrypt = ENCRYPT;
        let four = first_four(t0);
        // SAFETY: reading 64 bytes from a 4 x u128 array.
        let mut tw = unsafe { _mm512_loadu_si512(four.as_ptr().cast()) };
        let mut tweak = [_mm512_setzero_si512(); 8];
        let mut x = [_mm512_setzero_si512(); 8];
        for j in 0..8 {
            tweak[j] = tw;
            tw = mul_alpha4(tw);
            // SAFETY: the caller gives 512 readable bytes at src.
            x[j] = _mm512_xor_si512(
                unsafe { _mm512_loadu_si512(src.add(64 * j).cast()) },
                tweak[j],
            );
        }
        let ks = if encrypt { &self.ek1 } else { &self.dk1 };
        for j in 0..8 {
            x[j] = _mm512_xor_si512(x[j], ks[0]);
        }
        for r in 1..14 {
            let k = ks[r];
            for j in 0..8 {
                x[j] = if encrypt {
                    _mm512_aesenc_epi128(x[j], k)
                } else {
                    _mm512_aesdec_epi128(x[j], k)
                };
            }
        }
        for j in 0..8 {
            let y = if encrypt {
                _mm512_aesenclast_epi128(x[j], ks[14])
            } else {
                _mm512_aesdeclast_epi128(x[j], ks[14])
            };
            // SAFETY: the caller gives 512 writable bytes at dst.
            unsafe { _mm512_storeu_si512(dst.add(64 * j).cast(), _mm512_xor_si512(y, tweak[j])) };
        }
    }
}
