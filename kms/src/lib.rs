//! Where key-encryption keys (KEKs) come from.
//!
//! A KEK is a 256-bit AES key kept by a key provider; an image's data key
//! sits in a LUKS key slot that only the KEK opens. [`KeyProvider`] is what
//! the rest of vmcrypt sees; [`local::LocalKeyStore`] is the embedded
//! default for a single host or development.

// Every unsafe block says why it is sound (CI runs clippy with -D warnings).
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod kmip;
pub mod local;
pub mod tls;
mod wire;

use std::fmt;

use vmcrypt_crypto::locked::Locked;

pub use kmip::{KmipConfig, KmipProvider};
pub use local::LocalKeyStore;

/// Bytes of a KEK.
pub const KEK_LEN: usize = 32;

/// A key-encryption key: in locked memory, zeroed on drop, never printed.
#[derive(Clone)]
pub struct Kek(Locked<[u8; KEK_LEN]>);

impl Kek {
    /// A copy of `b` in locked memory (taken by reference: the caller
    /// zeroes its own).
    pub fn from_bytes(b: &[u8; KEK_LEN]) -> Self {
        let mut k = Locked::<[u8; KEK_LEN]>::zeroed();
        k.get_mut().copy_from_slice(b);
        Kek(k)
    }

    pub fn generate() -> Self {
        let mut k = Locked::<[u8; KEK_LEN]>::zeroed();
        getrandom::fill(k.get_mut()).expect("the OS random source failed");
        Kek(k)
    }

    pub fn as_bytes(&self) -> &[u8; KEK_LEN] {
        self.0.get()
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// The state of a key at its provider (KMIP's states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    PreActive,
    Active,
    Deactivated,
    Compromised,
    Destroyed,
    DestroyedCompromised,
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyState::PreActive => "pre-active",
            KeyState::Active => "active",
            KeyState::Deactivated => "deactivated (revoked)",
            KeyState::Compromised => "compromised (revoked)",
            KeyState::Destroyed => "destroyed",
            KeyState::DestroyedCompromised => "destroyed (compromised)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("key {id} not found at {provider}")]
    NotFound { provider: String, id: String },
    #[error("key {id} is {state}, not active; refusing to use it")]
    NotActive { id: String, state: KeyState },
    #[error("key store {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("key file {path} is open to others (mode {mode:o}); refusing to use it, as ssh refuses such keys: chmod 600 it")]
    Insecure { path: String, mode: u32 },
    #[error("key {id} at {provider} is malformed: {reason}")]
    Malformed {
        provider: String,
        id: String,
        reason: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("no KMS server reachable (tried {servers}): {last_error}")]
    Unreachable { servers: String, last_error: String },
    #[error("KMS {server}: {message}")]
    Server { server: String, message: String },
    #[error("KMS configuration {path}: {reason}")]
    Config { path: String, reason: String },
}

/// A source of KEKs.
pub trait KeyProvider: Send + Sync {
    /// A short description for logs and `info` ("local key store /path", "KMIP cluster a,b").
    fn describe(&self) -> String;
    /// The provider's kind as recorded in an image's key descriptor.
    fn kind(&self) -> &'static str;
    /// Creates a new active KEK named `name`; returns its id and bytes.
    fn create_kek(&self, name: &str) -> Result<(String, Kek), KmsError>;
    /// Fetches an active KEK by id; `name` (recorded at creation) finds it
    /// on a replica that gave it another id.
    fn get_kek(&self, id: &str, name: Option<&str>) -> Result<Kek, KmsError>;
    /// Revokes a KEK (it can no longer be fetched for use).
    fn revoke_kek(&self, id: &str) -> Result<(), KmsError>;
}
