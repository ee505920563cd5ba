//! LUKS1 containers: the on-disk format cryptsetup and QEMU share.
//!
//! Layout written by [`create`]: the 592-byte header at 0 (aes,
//! xts-plain64, sha256, 64-byte key), key-slot material for slot i at
//! sector 8 + 504 i (4000 anti-forensic stripes, 500 sectors, aligned to
//! 4 KiB), the payload at sector 4096 (2 MiB, as cryptsetup aligns it).
//! Headers written by cryptsetup and qemu-img (payload at 4040) open too.
//!
//! Header updates are ordered for crash safety: a new key slot's material is
//! written and synced before the header names it; a removed slot is first
//! disabled in the header (synced), then its material is overwritten. At
//! every point of `add_slot` then `remove_slot` (a rekey) at least one slot
//! opens the image. The header itself is one 592-byte write inside the first
//! 4 KiB block.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::af::{self, Hash};
use crate::key::{MasterKey, Passphrase, MASTER_KEY_LEN};
use crate::xts::{Xts, SECTOR};

pub const HEADER_LEN: usize = 592;
pub const NUM_SLOTS: usize = 8;
const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const STRIPES: u32 = 4000;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Key material of one slot: 64 * 4000 bytes = 500 sectors, aligned to 8.
const SLOT_SECTORS: u32 = 504;
const FIRST_SLOT_SECTOR: u32 = 8;
/// Where vmcrypt puts the payload: 2 MiB, as cryptsetup does.
pub const PAYLOAD_SECTORS: u32 = 4096;
/// PBKDF2 rounds for key slots and the master-key digest. The passphrases
/// vmcrypt makes are 256-bit random keys, for which rounds add nothing;
/// 1000 is the minimum cryptsetup accepts for LUKS1.
pub const DEFAULT_ITERATIONS: u32 = 1000;
/// Most PBKDF2 rounds a header may ask of a key slot or the master-key
/// digest before it is opened: 2^24 is about 10 s of SHA-256 here, several
/// times what cryptsetup picks for a 2 s unlock; a hostile header asking
/// 2^32 - 1 would take most of an hour.
pub const DEFAULT_MAX_ITERATIONS: u32 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{0}: already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("not a LUKS image (no LUKS magic at the start)")]
    NotLuks,
    #[error("LUKS version {0} is not supported (vmcrypt reads LUKS1)")]
    Version(u16),
    #[error("truncated LUKS image: {0}")]
    Truncated(String),
    #[error("unsupported LUKS {what} '{value}' (vmcrypt serves aes-xts-plain64 with a 512-bit key, sha1, sha256 or sha512)")]
    Unsupported { what: &'static str, value: String },
    #[error("corrupt LUKS header: {0}")]
    Corrupt(String),
    #[error("{what} asks for {iterations} PBKDF2 iterations, more than the limit of {limit} (raise it with --max-pbkdf2-iterations if the header is trusted)")]
    TooCostly {
        what: String,
        iterations: u32,
        limit: u32,
    },
    #[error("no key slot opens with this passphrase (wrong passphrase or key)")]
    WrongPassphrase,
    #[error("all 8 key slots are in use")]
    NoFreeSlot,
    #[error("key slot {0} is not in use")]
    SlotNotActive(usize),
    #[error("key slot {0} is the last one in use; removing it would lose the data")]
    LastSlot(usize),
    #[error(transparent)]
    Xts(#[from] crate::xts::XtsError),
}

/// One key slot as the header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// First sector of the slot's material.
    pub material_offset: u32,
    pub stripes: u32,
}

/// A LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash: Hash,
    /// First sector of the payload.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_digest_salt: [u8; SALT_LEN],
    pub mk_digest_iter: u32,
    pub uuid: String,
    pub slots: [KeySlot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn text(b: &[u8], what: &'static str) -> Result<String, LuksError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| LuksError::Corrupt(format!("{what} is not text")))
}

fn put_text(b: &mut [u8], s: &str) {
    b[..s.len()].copy_from_slice(s.as_bytes());
}

/// Checks that slot `i`'s material, `sectors` long from `offset`, lies
/// between the header's sectors (cryptsetup starts material at sector 8)
/// and the payload.
fn check_area(i: usize, offset: u32, sectors: u32, payload_offset: u32) -> Result<(), LuksError> {
    let end = u64::from(offset) + u64::from(sectors);
    if offset < FIRST_SLOT_SECTOR || end > u64::from(payload_offset) {
        return Err(LuksError::Corrupt(format!(
            "key slot {i} material at sectors {offset}..{end} is not between the header \
             (sectors 0..{FIRST_SLOT_SECTOR}) and the payload (sector {payload_offset})"
        )));
    }
    Ok(())
}

fn overlaps(a: &KeySlot, b: &KeySlot, sectors: u32) -> bool {
    let (a0, b0) = (u64::from(a.material_offset), u64::from(b.material_offset));
    let n = u64::from(sectors);
    a0 < b0 + n && b0 < a0 + n
}

impl Header {
    /// Checks the PBKDF2 cost the header asks of an unlock against `limit`.
    pub fn check_cost(&self, limit: u32) -> Result<(), LuksError> {
        let too = |what: String, iterations| LuksError::TooCostly {
            what,
            iterations,
            limit,
        };
        if self.mk_digest_iter > limit {
            return Err(too("the master-key digest".into(), self.mk_digest_iter));
        }
        for i in self.active_slots() {
            if self.slots[i].iterations > limit {
                return Err(too(format!("key slot {i}"), self.slots[i].iterations));
            }
        }
        Ok(())
    }

    /// Parses and checks a header (`buf` holds at least its 592 bytes).
    pub fn parse(buf: &[u8]) -> Result<Header, LuksError> {
        if buf.len() < HEADER_LEN {
            return Err(LuksError::Truncated(format!(
                "{} bytes, the header needs {HEADER_LEN}",
                buf.len()
            )));
        }
        if buf[..6] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        if version != 1 {
            return Err(LuksError::Version(version));
        }
        let cipher_name = text(&buf[8..40], "cipher name")?;
        let cipher_mode = text(&buf[40..72], "cipher mode")?;
        let hash_spec = text(&buf[72..104], "hash spec")?;
        let unsupported = |what, value: &str| LuksError::Unsupported {
            what,
            value: value.to_string(),
        };
        if cipher_name != "aes" {
            return Err(unsupported("cipher", &cipher_name));
        }
        if cipher_mode != "xts-plain64" {
            return Err(unsupported("cipher mode", &cipher_mode));
        }
        let hash = Hash::from_spec(&hash_spec).ok_or_else(|| unsupported("hash", &hash_spec))?;
        let key_bytes = be32(buf, 108);
        if key_bytes as usize != MASTER_KEY_LEN {
            return Err(unsupported(
                "key size",
                &format!("{} bits", u64::from(key_bytes) * 8),
            ));
        }
        let mut slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|_| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            material_offset: 0,
            stripes: 0,
        });
        let payload_offset = be32(buf, 104);
        if u64::from(payload_offset) * (SECTOR as u64) < HEADER_LEN as u64 {
            return Err(LuksError::Corrupt(format!(
                "payload at sector {payload_offset} overlaps the header"
            )));
        }
        let material_sectors = (key_bytes * STRIPES).div_ceil(SECTOR as u32);
        for (i, s) in slots.iter_mut().enumerate() {
            let at = 208 + i * 48;
            s.active = match be32(buf, at) {
                SLOT_ENABLED => true,
                SLOT_DISABLED => false,
                other => return Err(LuksError::Corrupt(format!("key slot {i} state {other:#x}"))),
            };
            s.iterations = be32(buf, at + 4);
            s.salt.copy_from_slice(&buf[at + 8..at + 40]);
            s.material_offset = be32(buf, at + 40);
            s.stripes = be32(buf, at + 44);
            if s.active {
                if s.iterations == 0 || s.stripes != STRIPES {
                    return Err(LuksError::Corrupt(format!(
                        "key slot {i}: {} iterations, {} stripes",
                        s.iterations, s.stripes
                    )));
                }
                check_area(i, s.material_offset, material_sectors, payload_offset)?;
            }
        }
        // Active slots' material must not overlap: writing one would
        // destroy another.
        for i in 0..NUM_SLOTS {
            for j in i + 1..NUM_SLOTS {
                let (a, b) = (&slots[i], &slots[j]);
                if a.active && b.active && overlaps(a, b, material_sectors) {
                    return Err(LuksError::Corrupt(format!(
                        "key slots {i} and {j} share key material sectors"
                    )));
                }
            }
        }
        let mk_digest_iter = be32(buf, 164);
        if mk_digest_iter == 0 {
            return Err(LuksError::Corrupt(
                "master-key digest has 0 iterations".into(),
            ));
        }
        Ok(Header {
            cipher_name,
            cipher_mode,
            hash,
            payload_offset,
            key_bytes,
            mk_digest: buf[112..132].try_into().unwrap(),
            mk_digest_salt: buf[132..164].try_into().unwrap(),
            mk_digest_iter,
            uuid: text(&buf[168..208], "uuid")?,
            slots,
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], self.hash.spec());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.material_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Byte offset of the payload.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR as u64
    }

    pub fn active_slots(&self) -> Vec<usize> {
        (0..NUM_SLOTS).filter(|&i| self.slots[i].active).collect()
    }

    fn material_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }

    fn digest(&self, key: &MasterKey) -> [u8; DIGEST_LEN] {
        let mut d = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(
            key.as_bytes(),
            &self.mk_digest_salt,
            self.mk_digest_iter,
            &mut d,
        );
        d
    }
}

/// Where a LUKS image lives: a file (or block device), or any storage
/// with positioned reads and writes (an RBD image).
pub trait Blocks {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes what was written durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Its size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = read_up_to(self, buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ends early",
            ));
        }
        Ok(())
    }
}

impl Blocks for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn size(&self) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let m = self.metadata()?;
        if m.file_type().is_file() {
            Ok(m.len())
        } else {
            // A block device: its size is where its end is.
            let mut f = self;
            f.seek(SeekFrom::End(0))
        }
    }
}

/// A LUKS1 image: its header and the storage it lives in.
pub struct Luks<'f> {
    pub header: Header,
    file: &'f dyn Blocks,
    path: PathBuf,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> LuksError + 'a {
    move |source| LuksError::Io {
        path: path.into(),
        what,
        source,
    }
}

/// A random version-4 UUID, lowercase.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    crate::random_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Creates a new image at `path` with `size` bytes of payload and a first
/// key slot opened by `passphrase`; returns the new master key. Refuses to
/// touch an existing file.
pub fn create(
    path: &Path,
    size: u64,
    passphrase: &Passphrase,
) -> Result<(Header, MasterKey), LuksError> {
    create_with_uuid(path, size, passphrase, &new_uuid())
}

/// As [`create`], with a chosen LUKS UUID.
pub fn create_with_uuid(
    path: &Path,
    size: u64,
    passphrase: &Passphrase,
    uuid: &str,
) -> Result<(Header, MasterKey), LuksError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                LuksError::Exists(path.into())
            } else {
                LuksError::Io {
                    path: path.into(),
                    what: "cannot create",
                    source: e,
                }
            }
        })?;
    let result = create_in(&file, path, size, passphrase, uuid);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn create_in(
    file: &File,
    path: &Path,
    size: u64,
    passphrase: &Passphrase,
    uuid: &str,
) -> Result<(Header, MasterKey), LuksError> {
    file.set_len(u64::from(PAYLOAD_SECTORS) * SECTOR as u64 + size)
        .map_err(io_err(path, "cannot size the image"))?;
    format(file, path, passphrase, uuid)
}

/// Writes a new LUKS1 header with a first key slot opened by `passphrase`
/// onto `blocks`, whose size is already the payload offset (2 MiB) plus
/// the disk's size; returns the new master key. `path` names it in errors.
pub fn format(
    file: &dyn Blocks,
    path: &Path,
    passphrase: &Passphrase,
    uuid: &str,
) -> Result<(Header, MasterKey), LuksError> {
    if uuid.len() >= 40 {
        return Err(LuksError::Corrupt(format!("UUID '{uuid}' is too long")));
    }
    let key = MasterKey::generate();
    let mut header = Header {
        cipher_name: "aes".into(),
        cipher_mode: "xts-plain64".into(),
        hash: Hash::Sha256,
        payload_offset: PAYLOAD_SECTORS,
        key_bytes: MASTER_KEY_LEN as u32,
        mk_digest: [0; DIGEST_LEN],
        mk_digest_salt: [0; SALT_LEN],
        mk_digest_iter: DEFAULT_ITERATIONS,
        uuid: uuid.into(),
        slots: std::array::from_fn(|i| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            material_offset: FIRST_SLOT_SECTOR + i as u32 * SLOT_SECTORS,
            stripes: STRIPES,
        }),
    };
    crate::random_bytes(&mut header.mk_digest_salt);
    header.mk_digest = header.digest(&key);
    let len = file.size().map_err(io_err(path, "cannot stat"))?;
    if len <= header.payload_bytes() {
        return Err(LuksError::Truncated(format!(
            "{len} bytes leave no room for a payload after the header's {}",
            header.payload_bytes()
        )));
    }
    let mut luks = Luks {
        header,
        file,
        path: path.into(),
    };
    luks.write_header()?;
    luks.add_slot(&key, passphrase)?;
    Ok((luks.header, key))
}

impl<'f> Luks<'f> {
    /// Reads and checks the header of an open image, refusing one that asks
    /// more than [`DEFAULT_MAX_ITERATIONS`] PBKDF2 rounds.
    pub fn open(file: &'f dyn Blocks, path: &Path) -> Result<Self, LuksError> {
        Self::open_with_limit(file, path, DEFAULT_MAX_ITERATIONS)
    }

    /// As [`Luks::open`], with at most `max_iterations` PBKDF2 rounds.
    pub fn open_with_limit(
        file: &'f dyn Blocks,
        path: &Path,
        max_iterations: u32,
    ) -> Result<Self, LuksError> {
        let len = file.size().map_err(io_err(path, "cannot stat"))?;
        let mut buf = [0u8; HEADER_LEN];
        let n = read_up_to(file, &mut buf, 0).map_err(io_err(path, "cannot read the header"))?;
        if n >= 6 && buf[..6] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        let header = Header::parse(&buf[..n])?;
        header.check_cost(max_iterations)?;
        if header.payload_bytes() > len {
            return Err(LuksError::Truncated(format!(
                "the payload starts at byte {} but the image has {len} bytes",
                header.payload_bytes()
            )));
        }
        Ok(Luks {
            header,
            file,
            path: path.into(),
        })
    }

    /// Opens the master key with `passphrase`, trying every active slot.
    pub fn unlock(&self, passphrase: &Passphrase) -> Result<(MasterKey, usize), LuksError> {
        for i in self.header.active_slots() {
            if let Some(key) = self.try_slot(i, passphrase)? {
                return Ok((key, i));
            }
        }
        Err(LuksError::WrongPassphrase)
    }

    fn slot_key(&self, slot: &KeySlot, passphrase: &Passphrase) -> Result<Xts, LuksError> {
        let mut k = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        self.header
            .hash
            .pbkdf2(passphrase.as_bytes(), &slot.salt, slot.iterations, &mut *k);
        Ok(Xts::new(&MasterKey::from_bytes(&k))?)
    }

    fn try_slot(&self, i: usize, passphrase: &Passphrase) -> Result<Option<MasterKey>, LuksError> {
        let slot = &self.header.slots[i];
        let len = self.header.material_len();
        let mut material = Zeroizing::new(vec![0u8; len.next_multiple_of(SECTOR)]);
        let at = u64::from(slot.material_offset) * SECTOR as u64;
        self.file
            .read_exact_at(&mut material, at)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    LuksError::Truncated(format!("key slot {i} material is cut off"))
                }
                _ => LuksError::Io {
                    path: self.path.clone(),
                    what: "cannot read key material",
                    source: e,
                },
            })?;
        // A key that happens to have equal halves cannot be this slot's.
        let Ok(mut xts) = self.slot_key(slot, passphrase) else {
            return Ok(None);
        };
        xts.decrypt_in_place(0, &mut material)?;
        let merged = af::merge(
            &material,
            self.header.key_bytes as usize,
            STRIPES as usize,
            self.header.hash,
        );
        let key = MasterKey::from_bytes(merged[..MASTER_KEY_LEN].try_into().unwrap());
        Ok((self.header.digest(&key) == self.header.mk_digest).then_some(key))
    }

    /// Checks that `key` is this image's master key.
    pub fn verify(&self, key: &MasterKey) -> bool {
        self.header.digest(key) == self.header.mk_digest
    }

    /// Adds a key slot opened by `passphrase` for the master key `key`.
    pub fn add_slot(
        &mut self,
        key: &MasterKey,
        passphrase: &Passphrase,
    ) -> Result<usize, LuksError> {
        if !self.verify(key) {
            return Err(LuksError::WrongPassphrase);
        }
        let i = (0..NUM_SLOTS)
            .find(|&i| !self.header.slots[i].active)
            .ok_or(LuksError::NoFreeSlot)?;
        let mut slot = self.header.slots[i].clone();
        if slot.material_offset == 0 {
            slot.material_offset = FIRST_SLOT_SECTOR + i as u32 * SLOT_SECTORS;
        }
        // An unused slot's recorded area is trusted no more than a used
        // one's: inside the key material region, clear of every slot in use.
        let material_sectors = (self.header.material_len()).div_ceil(SECTOR) as u32;
        check_area(
            i,
            slot.material_offset,
            material_sectors,
            self.header.payload_offset,
        )?;
        if let Some(j) = self
            .header
            .active_slots()
            .into_iter()
            .find(|&j| overlaps(&slot, &self.header.slots[j], material_sectors))
        {
            return Err(LuksError::Corrupt(format!(
                "unused key slot {i}'s material area overlaps key slot {j}"
            )));
        }
        slot.iterations = DEFAULT_ITERATIONS;
        slot.stripes = STRIPES;
        crate::random_bytes(&mut slot.salt);
        let mut material = af::split(key.as_bytes(), STRIPES as usize, self.header.hash);
        let padded = material.len().next_multiple_of(SECTOR);
        material.resize(padded, 0);
        self.slot_key(&slot, passphrase)?
            .encrypt_in_place(0, &mut material)?;
        // Material first and durable; only then does the header name it.
        let at = u64::from(slot.material_offset) * SECTOR as u64;
        self.file
            .write_all_at(&material, at)
            .map_err(io_err(&self.path, "cannot write key material"))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "cannot sync"))?;
        slot.active = true;
        self.header.slots[i] = slot;
        self.write_header()?;
        Ok(i)
    }

    /// Disables key slot `i` and overwrites its material. Refuses to remove
    /// the last active slot.
    pub fn remove_slot(&mut self, i: usize) -> Result<(), LuksError> {
        if i >= NUM_SLOTS || !self.header.slots[i].active {
            return Err(LuksError::SlotNotActive(i));
        }
        if self.header.active_slots().len() == 1 {
            return Err(LuksError::LastSlot(i));
        }
        self.header.slots[i].active = false;
        self.write_header()?;
        let mut junk = vec![0u8; self.header.material_len().next_multiple_of(SECTOR)];
        crate::random_bytes(&mut junk);
        let at = u64::from(self.header.slots[i].material_offset) * SECTOR as u64;
        self.file
            .write_all_at(&junk, at)
            .map_err(io_err(&self.path, "cannot wipe key material"))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "cannot sync"))
    }

    /// Gives the image a new LUKS UUID (a copy must not share its
    /// source's). Nothing else in the header changes.
    pub fn set_uuid(&mut self, uuid: &str) -> Result<(), LuksError> {
        if uuid.len() >= 40 {
            return Err(LuksError::Corrupt(format!("UUID '{uuid}' is too long")));
        }
        self.header.uuid = uuid.into();
        self.write_header()
    }

    fn write_header(&mut self) -> Result<(), LuksError> {
        self.file
            .write_all_at(&self.header.to_bytes(), 0)
            .map_err(io_err(&self.path, "cannot write the header"))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "cannot sync"))
    }
}

fn read_up_to<B: Blocks + ?Sized>(file: &B, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
