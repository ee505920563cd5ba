//! Cryptography for vmcrypt: the AES-256-XTS sector engine used on the data
//! path, and LUKS1 containers whose key slots hold the data key.

// Every unsafe block says why it is sound (CI runs clippy with -D warnings).
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod af;
pub mod key;
pub mod locked;
pub mod luks;
pub mod xts;

pub use key::{MasterKey, Passphrase};
pub use luks::{Blocks, Luks, LuksError};
pub use xts::{Xts, XtsError, SECTOR};

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random source failed");
}
