//! Key material types: in locked memory of their own (no swap, no core
//! dump), zeroed on drop, never printed.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use crate::locked::{Locked, LockedBytes};

/// Bytes of an AES-256-XTS key (two AES-256 keys).
pub const MASTER_KEY_LEN: usize = 64;

/// The data encryption key (DEK): the LUKS master key, AES-256-XTS.
#[derive(Clone)]
pub struct MasterKey(Locked<[u8; MASTER_KEY_LEN]>);

impl MasterKey {
    /// A fresh key from the OS random source (its two halves differ, as XTS requires).
    pub fn generate() -> Self {
        let mut k = Locked::<[u8; MASTER_KEY_LEN]>::zeroed();
        loop {
            crate::random_bytes(k.get_mut());
            if k.get()[..32] != k.get()[32..] {
                break;
            }
        }
        MasterKey(k)
    }

    /// A copy of `bytes` (taken by reference: the caller zeroes its own).
    pub fn from_bytes(bytes: &[u8; MASTER_KEY_LEN]) -> Self {
        let mut k = Locked::<[u8; MASTER_KEY_LEN]>::zeroed();
        k.get_mut().copy_from_slice(bytes);
        MasterKey(k)
    }

    pub fn as_bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        self.0.get()
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A key-slot passphrase.
#[derive(Clone)]
pub struct Passphrase(LockedBytes);

impl Passphrase {
    /// Moves `bytes` into locked memory and zeroes them.
    pub fn new(mut bytes: Vec<u8>) -> Self {
        let p = Passphrase(LockedBytes::from_slice(&bytes));
        bytes.zeroize();
        p
    }

    /// The passphrase vmcrypt derives from a 256-bit key-encryption key: its
    /// lowercase hex form. Text, because QEMU reads LUKS secrets as UTF-8.
    pub fn from_kek(kek: &[u8]) -> Self {
        Passphrase(LockedBytes::from_slice(
            Zeroizing::new(hex::encode(kek)).as_bytes(),
        ))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
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
        let k = MasterKey::from_bytes(&[0xab; 64]);
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
