//! The commands besides `serve`: create, info, export-passphrase.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vmcrypt_crypto::{luks, Luks, Passphrase};
use vmcrypt_kms::KeyProvider;

use crate::keys::{self, KeyDescriptor, KeyError, KeySource};
use crate::rbd::{CephOptions, RbdImage, RbdSpec};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Rbd(#[from] crate::rbd::RbdError),
}

pub(crate) fn io<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> CommandError + 'a {
    move |source| CommandError::Io {
        path: path.into(),
        what,
        source,
    }
}

pub(crate) fn luks_err(path: &Path) -> impl FnOnce(luks::LuksError) -> CommandError + '_ {
    move |source| {
        CommandError::Key(KeyError::Luks {
            path: path.into(),
            source,
        })
    }
}

/// `vmcrypt create`: a new LUKS1 image whose key slot opens with a fresh KEK.
pub fn create(
    image: &Path,
    size: u64,
    provider: &dyn KeyProvider,
    keystore: Option<PathBuf>,
) -> Result<(), CommandError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(CommandError::Invalid(format!(
            "--size {size}: must be a positive multiple of 4096 bytes"
        )));
    }
    if image.exists() {
        return Err(CommandError::Invalid(format!(
            "{}: already exists; refusing to overwrite it",
            image.display()
        )));
    }
    let descriptor_path = KeyDescriptor::path_for(image);
    if descriptor_path.exists() {
        return Err(CommandError::Invalid(format!(
            "{}: a key descriptor already exists there; remove it first",
            descriptor_path.display()
        )));
    }
    let uuid = luks::new_uuid();
    let name = format!("vmcrypt:{uuid}");
    let (key_id, kek) = provider.create_kek(&name).map_err(KeyError::from)?;
    let passphrase = Passphrase::from_kek(kek.as_bytes());
    drop(kek);
    let (header, _dek) =
        luks::create_with_uuid(image, size, &passphrase, &uuid).map_err(luks_err(image))?;
    let descriptor = KeyDescriptor {
        version: 1,
        luks_uuid: header.uuid.clone(),
        provider: provider.kind().into(),
        key_id: key_id.clone(),
        key_name: name,
        keystore,
    };
    if let Err(e) = descriptor.store(image, false) {
        let _ = std::fs::remove_file(image);
        return Err(e.into());
    }
    println!(
        "created {}: {} bytes, LUKS1 aes-xts-plain64, UUID {}\nkey-encryption key {} at {}\nkey descriptor {}",
        image.display(),
        size,
        header.uuid,
        key_id,
        provider.describe(),
        descriptor_path.display()
    );
    Ok(())
}

/// `vmcrypt create rbd:POOL/IMAGE`: a new RBD image with a LUKS1 header
/// inside, exactly as for a file; the key descriptor goes into the image's
/// metadata (`vmcrypt.descriptor`), as there is no file beside it.
pub fn create_rbd(
    spec: &RbdSpec,
    ceph: &CephOptions,
    size: u64,
    provider: &dyn KeyProvider,
    keystore: Option<PathBuf>,
) -> Result<(), CommandError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(CommandError::Invalid(format!(
            "--size {size}: must be a positive multiple of 4096 bytes"
        )));
    }
    let name = PathBuf::from(spec.to_string());
    let uuid = luks::new_uuid();
    let key_name = format!("vmcrypt:{uuid}");
    let (key_id, kek) = provider.create_kek(&key_name).map_err(KeyError::from)?;
    let passphrase = Passphrase::from_kek(kek.as_bytes());
    drop(kek);
    let header_bytes = u64::from(luks::PAYLOAD_SECTORS) * vmcrypt_crypto::SECTOR as u64;
    let rbd = RbdImage::create(spec, ceph, header_bytes + size)?;
    let (header, _dek) = luks::format(&rbd, &name, &passphrase, &uuid).map_err(luks_err(&name))?;
    let descriptor = KeyDescriptor {
        version: 1,
        luks_uuid: header.uuid.clone(),
        provider: provider.kind().into(),
        key_id: key_id.clone(),
        key_name,
        keystore,
    };
    rbd.metadata_set(keys::RBD_DESCRIPTOR_KEY, &descriptor.text())
        .map_err(io(&name, "cannot store the key descriptor in the metadata"))?;
    rbd.flush().map_err(io(&name, "cannot flush"))?;
    println!(
        "created {spec}: {size} bytes, LUKS1 aes-xts-plain64, UUID {}\nkey-encryption key {key_id} at {}\nkey descriptor in the image's metadata ({})",
        header.uuid,
        provider.describe(),
        keys::RBD_DESCRIPTOR_KEY
    );
    Ok(())
}

/// `vmcrypt export-passphrase rbd:POOL/IMAGE`: as [`export_passphrase`].
pub fn export_passphrase_rbd(
    spec: &RbdSpec,
    ceph: &CephOptions,
    output: &Path,
    source: &KeySource,
) -> Result<(), CommandError> {
    let name = PathBuf::from(spec.to_string());
    let rbd = RbdImage::open(spec, ceph, true)?;
    let l = Luks::open(&rbd, &name).map_err(luks_err(&name))?;
    let passphrase = match &source.passphrase_file {
        Some(p) => keys::read_passphrase_file(p)?,
        None => {
            let (d, at) = keys::rbd_descriptor(&rbd)?;
            keys::descriptor_key_with(&name, &at, d, &l.header, source)?.2
        }
    };
    write_passphrase(&name, &l, passphrase, output)
}

/// `vmcrypt info`: what an image is, without any secret.
pub fn info(image: &Path) -> Result<(), CommandError> {
    let file = File::open(image).map_err(io(image, "cannot open"))?;
    let descriptor = if keys::is_luks(&file) {
        KeyDescriptor::load(image)?
    } else {
        None
    };
    show_info(
        image,
        &file,
        descriptor,
        &KeyDescriptor::path_for(image).display().to_string(),
    )
}

/// `vmcrypt info rbd:POOL/IMAGE`: as [`info`], the descriptor from the
/// image's metadata.
pub fn info_rbd(spec: &RbdSpec, ceph: &CephOptions) -> Result<(), CommandError> {
    let name = PathBuf::from(spec.to_string());
    let rbd = RbdImage::open(spec, ceph, true)?;
    let (descriptor, at) = keys::rbd_descriptor(&rbd)?;
    show_info(&name, &rbd, descriptor, &at.display().to_string())
}

fn show_info(
    image: &Path,
    blocks: &dyn vmcrypt_crypto::Blocks,
    descriptor: Option<KeyDescriptor>,
    descriptor_at: &str,
) -> Result<(), CommandError> {
    let len = blocks.size().map_err(io(image, "cannot stat"))?;
    if !keys::is_luks(blocks) {
        println!(
            "image:      {}\nformat:     raw (not encrypted)\ncapacity:   {len} bytes",
            image.display()
        );
        return Ok(());
    }
    // Only shown, never unlocked: no PBKDF2 limit applies.
    let l = Luks::open_with_limit(blocks, image, u32::MAX).map_err(luks_err(image))?;
    let h = &l.header;
    println!("image:          {}", image.display());
    println!("format:         LUKS1");
    println!(
        "cipher:         {}-{}, {}-bit key",
        h.cipher_name,
        h.cipher_mode,
        h.key_bytes * 8
    );
    println!("hash:           {}", h.hash.spec());
    println!("uuid:           {}", h.uuid);
    println!(
        "payload offset: {} sectors ({} bytes)",
        h.payload_offset,
        h.payload_bytes()
    );
    println!(
        "capacity:       {} bytes",
        len.saturating_sub(h.payload_bytes())
    );
    println!("key slots:      {:?} in use", h.active_slots());
    match descriptor {
        Some(d) => {
            println!("key provider:   {}", d.provider);
            println!("key id:         {}", d.key_id);
            println!("key name:       {}", d.key_name);
            if let Some(k) = d.keystore {
                println!("key store:      {}", k.display());
            }
        }
        None => println!("key:            no key descriptor ({descriptor_at})"),
    }
    Ok(())
}

/// `vmcrypt export-passphrase`: the explicit recovery path. Writes the key
/// slot's passphrase to a new 0600 file, after checking that it opens the image.
pub fn export_passphrase(
    image: &Path,
    output: &Path,
    source: &KeySource,
) -> Result<(), CommandError> {
    let file = File::open(image).map_err(io(image, "cannot open"))?;
    let l = Luks::open(&file, image).map_err(luks_err(image))?;
    let passphrase = keys::passphrase_for(image, &l.header, source)?;
    write_passphrase(image, &l, passphrase, output)
}

/// Checks that `passphrase` opens the image, then writes it to `output`.
fn write_passphrase(
    image: &Path,
    l: &Luks<'_>,
    passphrase: Passphrase,
    output: &Path,
) -> Result<(), CommandError> {
    let (_key, slot) = l.unlock(&passphrase).map_err(luks_err(image))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .map_err(io(output, "cannot create (it must not exist)"))?;
    out.write_all(passphrase.as_bytes())
        .map_err(io(output, "cannot write"))?;
    out.sync_all().map_err(io(output, "cannot sync"))?;
    eprintln!(
        "wrote the passphrase of key slot {slot} of {} to {} (mode 0600): it opens the image, keep it safe",
        image.display(),
        output.display()
    );
    Ok(())
}

/// `vmcrypt rekey` (shallow rekey): a new KEK and key slot for the same
/// data key; the old slot is wiped, optionally the old KEK revoked.
///
/// Safe while the image is served: only the header area changes, never
/// the payload, and the running daemon holds the data key in memory. Each
/// step leaves an image that opens: the new slot is written and synced
/// before the header names it; the descriptor is replaced atomically
/// (rename) once the new slot exists; only then is the old slot disabled
/// and wiped.
pub fn rekey(
    image: &Path,
    old: &KeySource,
    new_provider: &dyn KeyProvider,
    keystore: Option<PathBuf>,
    revoke_old: bool,
) -> Result<(), CommandError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io(image, "cannot open"))?;
    // One header change at a time: an open file description lock on the
    // header's block (independent of the flock a running serve holds, and
    // taken also by qemu-img, whose locks sit in these bytes).
    lock_header(&file, image)?;
    let descriptor = KeyDescriptor::load(image)?;
    let at = KeyDescriptor::path_for(image);
    rekey_in(
        image,
        &file,
        (descriptor, &at),
        old,
        (new_provider, keystore),
        revoke_old,
        |d| Ok(d.store(image, true)?),
    )
}

/// `vmcrypt rekey rbd:POOL/IMAGE`: as [`rekey`], the descriptor in the
/// image's metadata (replaced in one metadata write). The image must not
/// be served meanwhile: the serving daemon holds librbd's exclusive lock,
/// without which the key slots cannot be written.
pub fn rekey_rbd(
    spec: &RbdSpec,
    ceph: &CephOptions,
    old: &KeySource,
    new_provider: &dyn KeyProvider,
    keystore: Option<PathBuf>,
    revoke_old: bool,
) -> Result<(), CommandError> {
    let name = PathBuf::from(spec.to_string());
    let rbd = RbdImage::open(spec, ceph, false)?;
    let (descriptor, at) = keys::rbd_descriptor(&rbd)?;
    rekey_in(
        &name,
        &rbd,
        (descriptor, &at),
        old,
        (new_provider, keystore),
        revoke_old,
        |d| {
            rbd.metadata_set(keys::RBD_DESCRIPTOR_KEY, &d.text())
                .map_err(io(&at, "cannot write"))
        },
    )
}

/// The rekey steps on any storage; `store` replaces the descriptor.
fn rekey_in(
    image: &Path,
    blocks: &dyn vmcrypt_crypto::Blocks,
    (descriptor, at): (Option<KeyDescriptor>, &Path),
    old: &KeySource,
    (new_provider, keystore): (&dyn KeyProvider, Option<PathBuf>),
    revoke_old: bool,
    store: impl FnOnce(&KeyDescriptor) -> Result<(), CommandError>,
) -> Result<(), CommandError> {
    let mut l = Luks::open(blocks, image).map_err(luks_err(image))?;
    let (descriptor, old_provider, old_passphrase) =
        keys::descriptor_key_with(image, at, descriptor, &l.header, old)?;
    let (dek, old_slot) = l.unlock(&old_passphrase).map_err(luks_err(image))?;
    drop(old_passphrase);

    let mut tag = [0u8; 4];
    vmcrypt_crypto::random_bytes(&mut tag);
    let name = format!("vmcrypt:{}:{}", l.header.uuid, hex::encode(tag));
    let (new_id, new_kek) = new_provider.create_kek(&name).map_err(KeyError::from)?;
    let new_slot = l
        .add_slot(&dek, &Passphrase::from_kek(new_kek.as_bytes()))
        .map_err(luks_err(image))?;
    drop(new_kek);
    store(&KeyDescriptor {
        version: 1,
        luks_uuid: l.header.uuid.clone(),
        provider: new_provider.kind().into(),
        key_id: new_id.clone(),
        key_name: name,
        keystore,
    })?;
    l.remove_slot(old_slot).map_err(luks_err(image))?;
    println!(
        "rekeyed {}: key slot {old_slot} (key {}) replaced by slot {new_slot} (key {new_id} at {})",
        image.display(),
        descriptor.key_id,
        new_provider.describe()
    );
    if revoke_old {
        old_provider
            .revoke_kek(&descriptor.key_id)
            .map_err(KeyError::from)?;
        println!(
            "revoked the old key {} at {}",
            descriptor.key_id,
            old_provider.describe()
        );
        eprintln!(
            "vmcrypt: warning: snapshots and shallow clones of {} made before this rekey \
             open only with the revoked key {}: they can no longer be served",
            image.display(),
            descriptor.key_id
        );
    }
    Ok(())
}

/// Takes a write lock on the image's first 4 KiB (the LUKS header) for as
/// long as `file` stays open, or fails at once if someone holds one.
fn lock_header(file: &File, image: &Path) -> Result<(), CommandError> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is a valid value; the fields that matter are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 4096;
    // SAFETY: F_OFD_SETLK reads the flock we own; the fd is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => CommandError::Invalid(format!(
            "{}: another process (a rekey, or qemu-img) is using the LUKS header; \
             try again when it is done",
            image.display()
        )),
        _ => CommandError::Invalid(format!("{}: cannot lock the header: {e}", image.display())),
    })
}

/// `vmcrypt kms check`: can each server be reached, and does it accept us?
pub fn kms_check(config: &Path) -> Result<(), CommandError> {
    let p = vmcrypt_kms::KmipProvider::from_file(config, std::time::Duration::from_secs(5))
        .map_err(KeyError::from)?;
    let mut failed = 0;
    for c in p.check() {
        match c.result {
            Ok(info) => println!("{}: ok, client accepted; {info}", c.server),
            Err(e) => {
                failed += 1;
                println!("{}: FAILED: {e}", c.server);
            }
        }
    }
    if failed > 0 {
        return Err(CommandError::Invalid(format!(
            "{failed} of the KMS servers failed the check"
        )));
    }
    Ok(())
}
