//! Which key opens an encrypted image, and opening it.
//!
//! `vmcrypt create` records the key-encryption key's provider and id in a
//! key descriptor next to the image (`IMAGE.vmcrypt`, TOML, no secrets).
//! The KEK, hex-encoded, is the passphrase of the image's LUKS key slot.
//! `serve` reads the descriptor, fetches the KEK, opens the slot, keeps the
//! master key (the DEK) and drops the KEK.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmcrypt_crypto::luks::{Header, LuksError};
use vmcrypt_crypto::{Luks, MasterKey, Passphrase};
use vmcrypt_kms::{KeyProvider, KmipProvider, KmsError, LocalKeyStore};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Luks { path: PathBuf, source: LuksError },
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("key descriptor {path}: {reason}")]
    Descriptor { path: PathBuf, reason: String },
    #[error("{image} is encrypted but has no key descriptor ({descriptor}); serve it with --passphrase-file")]
    NoDescriptor { image: PathBuf, descriptor: PathBuf },
    #[error("passphrase file {path}: {source}")]
    PassphraseFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{image}: {reason}")]
    Format { image: PathBuf, reason: String },
    #[error("the key-encryption key ({key_id}) is at a KMIP server: give --kms FILE")]
    KmsNotConfigured { key_id: String },
    #[error("unknown key provider '{0}' in the key descriptor")]
    UnknownProvider(String),
    #[error("the data key is unusable: {0}")]
    BadDataKey(#[source] vmcrypt_crypto::XtsError),
}

/// How an image is served, as the operator configured it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// The guest sees the image's bytes.
    Raw,
    /// A LUKS1 container: the guest sees its decrypted payload.
    Luks,
}

/// Decides how `image` is served from the configuration, never from its
/// bytes (which the guest may have written): a key descriptor beside it,
/// `--passphrase-file` or `--format luks` mean LUKS; `--format raw`, or none
/// of them, raw. When the image disagrees (no LUKS header where one is
/// configured, or a LUKS header and no configuration at all) the start is
/// refused, naming what settles it.
pub fn decide_format(
    image: &Path,
    file: &File,
    configured: Option<ImageFormat>,
    source: &KeySource,
) -> Result<ImageFormat, KeyError> {
    let refuse = |reason: String| KeyError::Format {
        image: image.into(),
        reason,
    };
    let descriptor = KeyDescriptor::path_for(image);
    let has_descriptor = descriptor.symlink_metadata().is_ok();
    let has_header = is_luks(file);
    let why_luks = match (configured, &source.passphrase_file, has_descriptor) {
        (Some(ImageFormat::Raw), Some(_), _) => {
            return Err(refuse(
                "--passphrase-file opens LUKS images; drop it or --format raw".into(),
            ))
        }
        (Some(ImageFormat::Raw), None, true) => {
            return Err(refuse(format!(
                "its key descriptor {} says it is encrypted: --format raw would hand its \
                 ciphertext and key slots to the guest (remove the descriptor if that is meant)",
                descriptor.display()
            )))
        }
        (Some(ImageFormat::Raw), None, false) => return Ok(ImageFormat::Raw),
        (Some(ImageFormat::Luks), _, _) => "--format luks is given".to_string(),
        (None, Some(_), _) => "--passphrase-file is given".to_string(),
        (None, None, true) => format!("its key descriptor {} exists", descriptor.display()),
        (None, None, false) if has_header => {
            return Err(refuse(format!(
                "it has a LUKS header but no key descriptor ({}) and no --passphrase-file: \
                 give its key, or --format raw to serve it raw (a guest that encrypts its own disk)",
                descriptor.display()
            )))
        }
        (None, None, false) => return Ok(ImageFormat::Raw),
    };
    if !has_header {
        return Err(refuse(format!(
            "it has no LUKS header, but {why_luks}: refusing to serve it (a damaged header \
             can be restored from a backup with cryptsetup luksHeaderRestore)"
        )));
    }
    Ok(ImageFormat::Luks)
}

/// The key descriptor kept next to an encrypted image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeyDescriptor {
    pub version: u32,
    /// The LUKS UUID of the image this descriptor belongs to.
    pub luks_uuid: String,
    /// "local" or "kmip".
    pub provider: String,
    /// The KEK's id at its provider (a KMIP unique identifier for "kmip").
    pub key_id: String,
    /// The KEK's name at its provider (`vmcrypt:<luks-uuid>`).
    pub key_name: String,
    /// For "local": the key store folder the key was created in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystore: Option<PathBuf>,
}

const DESCRIPTOR_HEAD: &str =
    "# vmcrypt key descriptor: names the key-encryption key that opens the\n\
# LUKS key slot of the image beside it. It holds no secret.\n";

/// What a key descriptor's file name adds to its image's.
pub const DESCRIPTOR_SUFFIX: &str = ".vmcrypt";

impl KeyDescriptor {
    pub fn path_for(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(DESCRIPTOR_SUFFIX);
        PathBuf::from(p)
    }

    pub fn load(image: &Path) -> Result<Option<Self>, KeyError> {
        let path = Self::path_for(image);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(KeyError::Descriptor {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        Self::parse(&text, &path).map(Some)
    }

    /// A descriptor from its text; `path` names where it came from.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeyError> {
        let d: KeyDescriptor = toml::from_str(text).map_err(|e| KeyError::Descriptor {
            path: path.into(),
            reason: e.to_string(),
        })?;
        if d.version != 1 {
            return Err(KeyError::Descriptor {
                path: path.into(),
                reason: format!("version {} is not supported", d.version),
            });
        }
        Ok(d)
    }

    /// The descriptor as its file holds it.
    pub fn text(&self) -> String {
        format!(
            "{DESCRIPTOR_HEAD}{}",
            toml::to_string(self).expect("descriptor serializes")
        )
    }

    /// Writes the descriptor; `replace` swaps it atomically (rename), else
    /// an existing one is an error.
    pub fn store(&self, image: &Path, replace: bool) -> Result<(), KeyError> {
        let path = Self::path_for(image);
        let err = |e: std::io::Error| KeyError::Descriptor {
            path: path.clone(),
            reason: e.to_string(),
        };
        let text = self.text();
        let target = if replace {
            let tmp = path.with_extension("vmcrypt.tmp");
            // A file left by a crash, or anything planted there (a symlink
            // to a file of root's), is removed as a name, never written
            // through.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
                _ => tmp,
            }
        } else {
            path.clone()
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&target)
            .map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        if replace {
            std::fs::rename(&target, &path).map_err(err)?;
        }
        // The name (new or renamed) must be durable before the caller goes
        // on: a rekey wipes the old key slot next.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

/// Where the key for an encrypted image comes from.
#[derive(Clone, Debug, Default)]
pub struct KeySource {
    /// A passphrase file (images made elsewhere, or recovery).
    pub passphrase_file: Option<PathBuf>,
    /// The local key store folder, overriding the descriptor's.
    pub keystore: Option<PathBuf>,
    /// The KMS configuration for images whose KEK is at a KMIP server.
    pub kms: Option<PathBuf>,
    /// How long to keep trying an unreachable KMS.
    pub kms_deadline: std::time::Duration,
    /// Most PBKDF2 iterations a header may ask before it is opened.
    pub max_iterations: u32,
}

impl KeySource {
    /// The provider new keys are made at: the KMS if configured, else the local key store.
    pub fn new_key_provider(&self) -> Result<Box<dyn KeyProvider>, KeyError> {
        match &self.kms {
            Some(path) => Ok(Box::new(KmipProvider::from_file(path, self.kms_deadline)?)),
            None => Ok(Box::new(LocalKeyStore::new(
                &self
                    .keystore
                    .clone()
                    .unwrap_or_else(LocalKeyStore::default_dir),
            ))),
        }
    }
}

/// True if the image (a file, or any storage) starts with the LUKS magic.
pub fn is_luks(blocks: &dyn vmcrypt_crypto::Blocks) -> bool {
    let mut magic = [0u8; 6];
    blocks.read_exact_at(&mut magic, 0).is_ok() && &magic == b"LUKS\xba\xbe"
}

/// Reads a passphrase file: its bytes as they are (as cryptsetup's
/// --key-file does), except one trailing newline.
pub fn read_passphrase_file(path: &Path) -> Result<Passphrase, KeyError> {
    let mut bytes = std::fs::read(path).map_err(|source| KeyError::PassphraseFile {
        path: path.into(),
        source,
    })?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    Ok(Passphrase::new(bytes))
}

/// The provider a descriptor names.
pub fn provider_for(
    d: &KeyDescriptor,
    source: &KeySource,
) -> Result<Box<dyn KeyProvider>, KeyError> {
    match d.provider.as_str() {
        "local" => {
            let dir = source
                .keystore
                .clone()
                .or_else(|| d.keystore.clone())
                .unwrap_or_else(LocalKeyStore::default_dir);
            Ok(Box::new(LocalKeyStore::new(&dir)))
        }
        "kmip" => match &source.kms {
            Some(path) => Ok(Box::new(KmipProvider::from_file(
                path,
                source.kms_deadline,
            )?)),
            None => Err(KeyError::KmsNotConfigured {
                key_id: d.key_id.clone(),
            }),
        },
        other => Err(KeyError::UnknownProvider(other.to_string())),
    }
}

/// The passphrase that opens `image`: from the passphrase file, or the KEK
/// named by its descriptor.
pub fn passphrase_for(
    image: &Path,
    header: &Header,
    source: &KeySource,
) -> Result<Passphrase, KeyError> {
    match &source.passphrase_file {
        Some(p) => read_passphrase_file(p),
        None => descriptor_key(image, header, source).map(|(_, _, passphrase)| passphrase),
    }
}

/// The key descriptor of `image` (checked to belong to its LUKS header),
/// the provider it names, and the passphrase made from the KEK fetched there.
pub fn descriptor_key(
    image: &Path,
    header: &Header,
    source: &KeySource,
) -> Result<(KeyDescriptor, Box<dyn KeyProvider>, Passphrase), KeyError> {
    let descriptor = KeyDescriptor::load(image)?;
    descriptor_key_with(
        image,
        &KeyDescriptor::path_for(image),
        descriptor,
        header,
        source,
    )
}

/// As [`descriptor_key`], with the descriptor already read (from `at`: a
/// file, or an RBD image's metadata).
pub fn descriptor_key_with(
    image: &Path,
    at: &Path,
    descriptor: Option<KeyDescriptor>,
    header: &Header,
    source: &KeySource,
) -> Result<(KeyDescriptor, Box<dyn KeyProvider>, Passphrase), KeyError> {
    let descriptor = descriptor.ok_or_else(|| KeyError::NoDescriptor {
        image: image.into(),
        descriptor: at.into(),
    })?;
    if descriptor.luks_uuid != header.uuid {
        return Err(KeyError::Descriptor {
            path: at.into(),
            reason: format!(
                "it belongs to LUKS UUID {}, the image has {}",
                descriptor.luks_uuid, header.uuid
            ),
        });
    }
    let provider = provider_for(&descriptor, source)?;
    tracing::info!(key_id = %descriptor.key_id, provider = %provider.describe(), "fetching the key-encryption key");
    let kek = provider.get_kek(&descriptor.key_id, Some(&descriptor.key_name))?;
    let passphrase = Passphrase::from_kek(kek.as_bytes());
    Ok((descriptor, provider, passphrase))
}

/// Where an image's key came from (no secret: for status and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyOrigin {
    /// The key provider, as it describes itself, or the passphrase file.
    pub provider: String,
    /// The KEK's id at the provider (none for a passphrase file).
    pub key_id: Option<String>,
}

/// An unlocked LUKS image.
pub struct Unlocked {
    pub header: Header,
    pub key: MasterKey,
    pub origin: KeyOrigin,
}

/// Opens the LUKS header of `image` and unlocks its master key.
pub fn unlock(image: &Path, file: &File, source: &KeySource) -> Result<Unlocked, KeyError> {
    let descriptor = match &source.passphrase_file {
        Some(_) => None,
        None => KeyDescriptor::load(image)?,
    };
    unlock_blocks(
        image,
        file,
        &KeyDescriptor::path_for(image),
        descriptor,
        source,
    )
}

/// The metadata key under which an RBD image keeps its key descriptor.
pub const RBD_DESCRIPTOR_KEY: &str = "vmcrypt.descriptor";

/// An RBD image's key descriptor, read from its metadata, and where it
/// is (for messages).
pub fn rbd_descriptor(
    rbd: &crate::rbd::RbdImage,
) -> Result<(Option<KeyDescriptor>, PathBuf), KeyError> {
    let at = PathBuf::from(format!("{} metadata {RBD_DESCRIPTOR_KEY}", rbd.spec()));
    let text = rbd
        .metadata_get(RBD_DESCRIPTOR_KEY)
        .map_err(|e| KeyError::Descriptor {
            path: at.clone(),
            reason: e.to_string(),
        })?;
    let d = text.map(|t| KeyDescriptor::parse(&t, &at)).transpose()?;
    Ok((d, at))
}

/// As [`unlock`], for any storage, with its descriptor already read (from
/// `at`).
pub fn unlock_blocks(
    image: &Path,
    blocks: &dyn vmcrypt_crypto::Blocks,
    at: &Path,
    descriptor: Option<KeyDescriptor>,
    source: &KeySource,
) -> Result<Unlocked, KeyError> {
    let luks_err = |source| KeyError::Luks {
        path: image.into(),
        source,
    };
    let luks = Luks::open_with_limit(blocks, image, source.max_iterations).map_err(luks_err)?;
    let (passphrase, origin) = match &source.passphrase_file {
        Some(p) => (
            read_passphrase_file(p)?,
            KeyOrigin {
                provider: format!("passphrase file {}", p.display()),
                key_id: None,
            },
        ),
        None => {
            let (descriptor, provider, passphrase) =
                descriptor_key_with(image, at, descriptor, &luks.header, source)?;
            let origin = KeyOrigin {
                provider: provider.describe(),
                key_id: Some(descriptor.key_id),
            };
            (passphrase, origin)
        }
    };
    let (key, slot) = luks.unlock(&passphrase).map_err(luks_err)?;
    tracing::info!(slot, uuid = %luks.header.uuid, "opened the image's key slot");
    Ok(Unlocked {
        header: luks.header,
        key,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_refuse_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let d = KeyDescriptor {
            version: 1,
            luks_uuid: "u".into(),
            provider: "local".into(),
            key_id: "abc".into(),
            key_name: "vmcrypt:u".into(),
            keystore: Some("/k".into()),
        };
        d.store(&img, false).unwrap();
        assert!(d.store(&img, false).is_err());
        assert_eq!(KeyDescriptor::load(&img).unwrap(), Some(d.clone()));
        let d2 = KeyDescriptor {
            key_id: "def".into(),
            ..d
        };
        d2.store(&img, true).unwrap();
        assert_eq!(KeyDescriptor::load(&img).unwrap(), Some(d2.clone()));
        assert_eq!(
            KeyDescriptor::path_for(&img),
            dir.path().join("disk.img.vmcrypt")
        );

        // A symlink planted where the new descriptor is written first (as
        // a user who may write the image's folder could, for a root
        // `rekey`): its target is never written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("disk.img.vmcrypt.tmp")).unwrap();
        d2.store(&img, true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(KeyDescriptor::load(&img).unwrap(), Some(d2));
    }
}
