//! The LUKS1 anti-forensic splitter: a key is spread over many stripes so
//! that erasing any part of a key slot's material destroys the key.

use sha1::Sha1;
use sha2::digest::{Digest, FixedOutputReset};
use sha2::{Sha256, Sha512};
use zeroize::Zeroizing;

/// The hash used by the splitter and PBKDF2 (LUKS1 `hash-spec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    pub fn from_spec(spec: &str) -> Option<Hash> {
        match spec {
            "sha1" => Some(Hash::Sha1),
            "sha256" => Some(Hash::Sha256),
            "sha512" => Some(Hash::Sha512),
            _ => None,
        }
    }

    pub fn spec(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
            Hash::Sha512 => "sha512",
        }
    }

    /// PBKDF2-HMAC with this hash.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, rounds, out),
        }
    }

    fn diffuse(self, block: &mut [u8]) {
        match self {
            Hash::Sha1 => diffuse::<Sha1>(block),
            Hash::Sha256 => diffuse::<Sha256>(block),
            Hash::Sha512 => diffuse::<Sha512>(block),
        }
    }
}

/// LUKS1 diffusion: each digest-sized piece i becomes H(be32(i) || piece).
fn diffuse<D: Digest + FixedOutputReset>(block: &mut [u8]) {
    let size = <D as Digest>::output_size();
    let mut h = D::new();
    for (i, piece) in block.chunks_mut(size).enumerate() {
        Digest::update(&mut h, (i as u32).to_be_bytes());
        Digest::update(&mut h, &*piece);
        let out = h.finalize_reset();
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
    }
}

/// Splits `key` into `stripes` stripes (the returned buffer is
/// `key.len() * stripes` bytes).
pub fn split(key: &[u8], stripes: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    let mut d = Zeroizing::new(vec![0u8; n]);
    crate::random_bytes(&mut out[..n * (stripes - 1)]);
    for s in out[..n * (stripes - 1)].chunks(n) {
        for (x, y) in d.iter_mut().zip(s) {
            *x ^= y;
        }
        hash.diffuse(&mut d);
    }
    for (i, o) in out[n * (stripes - 1)..].iter_mut().enumerate() {
        *o = d[i] ^ key[i];
    }
    out
}

/// Recovers a key of `n` bytes from its stripes.
pub fn merge(material: &[u8], n: usize, stripes: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; n]);
    for s in material[..n * (stripes - 1)].chunks(n) {
        for (x, y) in d.iter_mut().zip(s) {
            *x ^= y;
        }
        hash.diffuse(&mut d);
    }
    for (x, y) in d.iter_mut().zip(&material[n * (stripes - 1)..n * stripes]) {
        *x ^= y;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_round_trips() {
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let key: Vec<u8> = (0..64).collect();
            let m = split(&key, 4000, hash);
            assert_eq!(m.len(), 64 * 4000);
            assert_eq!(&merge(&m, 64, 4000, hash)[..], &key[..]);
            // Any damaged stripe destroys the key.
            let mut bad = m.clone();
            bad[1000] ^= 1;
            assert_ne!(&merge(&bad, 64, 4000, hash)[..], &key[..]);
        }
    }
}
