//! Key material types: zeroed on drop, never printed.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of an AES-256-XTS key (two AES-256 keys).
pub const MASTER_KEY_LEN: usize = 64;

/// The data encryption key (DEK): the LUKS master key, AES-256-XTS.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl MasterKey {
    /// A fresh key from the OS random source (its two halves differ, as XTS requires).
    pub fn generate() -> Self {
        let mut k = [0u8; MASTER_KEY_LEN];
        loop {
            crate::random_bytes(&mut k);
            if k[..32] != k[32..] {
                break;
            }
        }
        let key = MasterKey(k);
        k.zeroize();
        key
    }

    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> Self {
        MasterKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A key-slot passphrase.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Passphrase(Vec<u8>);

impl Passphrase {
    pub fn new(bytes: Vec<u8>) -> Self {
        Passphrase(bytes)
    }

    /// The passphrase vmcrypt derives from a 256-bit key-encryption key: its
    /// lowercase hex form. Text, because QEMU reads LUKS secrets as UTF-8.
    pub fn from_kek(kek: &[u8]) -> Self {
        Passphrase(Zeroizing::new(hex::encode(kek)).as_bytes().to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let k = MasterKey::from_bytes([0xab; 64]);
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
        let p = Passphrase::from_kek(&[0xcd; 32]);
        assert!(!format!("{p:?}").contains("cd"));
        assert_eq!(p.as_bytes().len(), 64);
    }

    #[test]
    fn generated_keys_differ() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes()[..32], a.as_bytes()[32..]);
    }
}
