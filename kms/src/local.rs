//! The embedded local key store: a directory of 256-bit KEKs, one 0600 file
//! per key id. It lets anyone try vmcrypt without a KMS; it is meant for a
//! single host or for development: the keys sit on the same host as the
//! images they open, which a KMS exists to avoid.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{Kek, KeyProvider, KeyState, KmsError, KEK_LEN};

/// Suffix of a key file; a revoked key is renamed to `.revoked`.
const KEY_SUFFIX: &str = ".key";
const REVOKED_SUFFIX: &str = ".revoked";

pub struct LocalKeyStore {
    dir: PathBuf,
}

impl LocalKeyStore {
    /// The default folder: `$XDG_DATA_HOME/vmcrypt/keys`, or
    /// `~/.local/share/vmcrypt/keys`.
    pub fn default_dir() -> PathBuf {
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("/var/lib"));
        base.join("vmcrypt/keys")
    }

    pub fn new(dir: &Path) -> Self {
        LocalKeyStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> KmsError + '_ {
        move |source| KmsError::Io {
            path: self.dir.display().to_string(),
            what,
            source,
        }
    }

    fn path(&self, id: &str, suffix: &str) -> Result<PathBuf, KmsError> {
        // Ids are hex: nothing that could climb out of the folder.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(KmsError::NotFound {
                provider: self.describe(),
                id: id.into(),
            });
        }
        Ok(self.dir.join(format!("{id}{suffix}")))
    }
}

impl KeyProvider for LocalKeyStore {
    fn describe(&self) -> String {
        format!("local key store {}", self.dir.display())
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn create_kek(&self, name: &str) -> Result<(String, Kek), KmsError> {
        fs::create_dir_all(&self.dir).map_err(self.io("cannot create"))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(self.io("cannot restrict"))?;
        let mut idb = [0u8; 16];
        getrandom::fill(&mut idb).expect("the OS random source failed");
        let id = hex::encode(idb);
        let kek = Kek::generate();
        let path = self.path(&id, KEY_SUFFIX)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(self.io("cannot create a key file"))?;
        f.write_all(kek.as_bytes())
            .map_err(self.io("cannot write a key file"))?;
        f.sync_all().map_err(self.io("cannot sync a key file"))?;
        // The new name must survive a power loss too.
        sync_dir(&self.dir).map_err(self.io("cannot sync the key store"))?;
        tracing::info!(key_id = %id, name, store = %self.dir.display(), "created a key-encryption key");
        Ok((id, kek))
    }

    fn get_kek(&self, id: &str, _name: Option<&str>) -> Result<Kek, KmsError> {
        let path = self.path(id, KEY_SUFFIX)?;
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.path(id, REVOKED_SUFFIX)?.exists() {
                    return Err(KmsError::NotActive {
                        id: id.into(),
                        state: KeyState::Deactivated,
                    });
                }
                return Err(KmsError::NotFound {
                    provider: self.describe(),
                    id: id.into(),
                });
            }
            Err(e) => return Err(self.io("cannot open a key file")(e)),
        };
        let mode = f
            .metadata()
            .map_err(self.io("cannot stat a key file"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(KmsError::Insecure {
                path: path.display().to_string(),
                mode: mode & 0o777,
            });
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(KEK_LEN + 1));
        Read::by_ref(&mut f)
            .take(KEK_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(self.io("cannot read a key file"))?;
        let bytes: &[u8; KEK_LEN] = buf.as_slice().try_into().map_err(|_| KmsError::Malformed {
            provider: self.describe(),
            id: id.into(),
            reason: format!("{} bytes, expected {KEK_LEN}", buf.len()),
        })?;
        Ok(Kek::from_bytes(bytes))
    }

    fn revoke_kek(&self, id: &str) -> Result<(), KmsError> {
        let from = self.path(id, KEY_SUFFIX)?;
        let to = self.path(id, REVOKED_SUFFIX)?;
        fs::rename(&from, &to).map_err(self.io("cannot revoke a key"))?;
        sync_dir(&self.dir).map_err(self.io("cannot sync the key store"))?;
        tracing::info!(key_id = id, "revoked a key-encryption key");
        Ok(())
    }
}

/// Makes the directory's entries (a new or renamed file) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_get_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeyStore::new(&dir.path().join("keys"));
        let (id, kek) = store.create_kek("vmcrypt:test").unwrap();
        let mode = fs::metadata(store.path(&id, KEY_SUFFIX).unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(store.get_kek(&id, None).unwrap().as_bytes(), kek.as_bytes());
        // A key file others can read is refused, as ssh refuses such keys.
        let file = store.path(&id, KEY_SUFFIX).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = store.get_kek(&id, None).err().unwrap();
        assert!(
            matches!(err, KmsError::Insecure { mode: 0o644, .. }),
            "{err}"
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        store.revoke_kek(&id).unwrap();
        assert!(matches!(
            store.get_kek(&id, None),
            Err(KmsError::NotActive { .. })
        ));
        assert!(matches!(
            store.get_kek("0123", None),
            Err(KmsError::NotFound { .. })
        ));
        assert!(matches!(
            store.get_kek("../etc/passwd", None),
            Err(KmsError::NotFound { .. })
        ));
    }

    #[test]
    fn malformed_key_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeyStore::new(dir.path());
        let file = dir.path().join("abc.key");
        fs::write(&file, b"short").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let err = store.get_kek("abc", None).unwrap_err().to_string();
        assert!(err.contains("5 bytes"), "{err}");
    }
}
