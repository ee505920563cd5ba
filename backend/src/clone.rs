//! `vmcrypt clone SRC DST [--deep]`: a copy of an image that is not being
//! served (a snapshot, say), with a key of its own.
//!
//! - Shallow (the default): DST keeps SRC's data key but opens only with a
//!   new KEK: its only key slot is made for the new KEK, SRC's slots are
//!   wiped from the copy, and it gets a LUKS UUID of its own. The data is
//!   shared with a reflink where the file system has them, else copied
//!   (holes stay holes).
//! - Deep (`--deep`): DST gets a new data key as well. Every data extent
//!   of SRC is decrypted and encrypted again with the new key while it is
//!   copied, on every core. Holes (never written, or discarded) stay holes:
//!   they held no data. This is also the deep rekey of a VM's disk: clone,
//!   then serve the clone instead.
//!
//! DST appears only when complete: everything is written to `DST.partial`,
//! synced, and renamed at the end; a failure removes it again.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vmcrypt_crypto::{luks, Luks, MasterKey, Passphrase, Xts, SECTOR};
use vmcrypt_kms::KeyProvider;
use zeroize::Zeroize;

use crate::commands::{io, luks_err, CommandError};
use crate::keys::{self, KeyDescriptor, KeyError, KeySource};

/// What to clone, and how.
pub struct CloneRequest<'a> {
    pub src: &'a Path,
    pub dst: &'a Path,
    /// Where SRC's key comes from.
    pub old: &'a KeySource,
    /// Where DST's new KEK is made, and the key store folder to record.
    pub new_provider: &'a dyn KeyProvider,
    pub keystore: Option<PathBuf>,
    pub deep: bool,
}

/// Copies are cut into pieces of this size, one per worker at a time.
const CHUNK: u64 = 4 << 20;

/// Runs the clone and prints what was done.
pub fn clone(r: &CloneRequest<'_>) -> Result<(), CommandError> {
    for p in [r.dst.to_path_buf(), KeyDescriptor::path_for(r.dst)] {
        if p.exists() {
            return Err(CommandError::Invalid(format!(
                "{}: already exists; refusing to overwrite it",
                p.display()
            )));
        }
    }
    let src = File::open(r.src).map_err(io(r.src, "cannot open"))?;
    lock_shared(&src, r.src)?;
    let partial = partial_path(r.dst);
    let mut guard = Partial::new(&partial)?;
    let started = Instant::now();

    if !keys::is_luks(&src) {
        if r.deep {
            return Err(CommandError::Invalid(format!(
                "{}: not encrypted (no LUKS header); --deep makes a new data key and needs an \
                 encrypted image",
                r.src.display()
            )));
        }
        let how = copy_file(&src, &guard.file, r.src)?;
        guard.finish(r.dst)?;
        println!(
            "cloned {} to {} ({how}, not encrypted) in {:.2} s",
            r.src.display(),
            r.dst.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }

    let l = Luks::open(&src, r.src).map_err(luks_err(r.src))?;
    let passphrase = keys::passphrase_for(r.src, &l.header, r.old)?;
    let (dek, _) = l.unlock(&passphrase).map_err(luks_err(r.src))?;
    drop(passphrase);

    let uuid = luks::new_uuid();
    let name = format!("vmcrypt:{uuid}");
    let (key_id, kek) = r.new_provider.create_kek(&name).map_err(KeyError::from)?;
    let new_passphrase = Passphrase::from_kek(kek.as_bytes());
    drop(kek);
    let result = if r.deep {
        deep_copy(&src, &l, &dek, &mut guard, &new_passphrase, &uuid)
    } else {
        shallow_copy(&src, &dek, &guard, &new_passphrase, &uuid)
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            // The new KEK opens nothing: take it back.
            let _ = r.new_provider.revoke_kek(&key_id);
            return Err(e);
        }
    };
    KeyDescriptor {
        version: 1,
        luks_uuid: uuid.clone(),
        provider: r.new_provider.kind().into(),
        key_id: key_id.clone(),
        key_name: name,
        keystore: r.keystore.clone(),
    }
    .store(r.dst, false)?;
    if let Err(e) = guard.finish(r.dst) {
        let _ = std::fs::remove_file(KeyDescriptor::path_for(r.dst));
        return Err(e);
    }
    println!(
        "cloned {} to {} ({summary}) in {:.2} s\nLUKS UUID {uuid}, key-encryption key {key_id} at {}",
        r.src.display(),
        r.dst.display(),
        started.elapsed().as_secs_f64(),
        r.new_provider.describe()
    );
    Ok(())
}

/// Same data key: copy the whole file, then replace its key slots.
fn shallow_copy(
    src: &File,
    dek: &MasterKey,
    dst: &Partial,
    passphrase: &Passphrase,
    uuid: &str,
) -> Result<String, CommandError> {
    let how = copy_file(src, &dst.file, &dst.path)?;
    let mut l = Luks::open(&dst.file, &dst.path).map_err(luks_err(&dst.path))?;
    let old_slots = l.header.active_slots();
    l.set_uuid(uuid).map_err(luks_err(&dst.path))?;
    let slot = l.add_slot(dek, passphrase).map_err(luks_err(&dst.path))?;
    for i in old_slots {
        l.remove_slot(i).map_err(luks_err(&dst.path))?;
    }
    Ok(format!(
        "shallow: same data key, {how}, key slot {slot} for a new key-encryption key"
    ))
}

/// A new data key: a new header, then every data extent re-encrypted.
fn deep_copy(
    src: &File,
    l: &Luks<'_>,
    old_key: &MasterKey,
    dst: &mut Partial,
    passphrase: &Passphrase,
    uuid: &str,
) -> Result<String, CommandError> {
    let src_payload = l.header.payload_bytes();
    let len = src.metadata().map_err(io(&dst.path, "cannot stat"))?.len();
    let size = len.saturating_sub(src_payload);
    // luks::create makes the file itself.
    dst.release_file();
    let (header, new_key) =
        luks::create_with_uuid(&dst.path, size, passphrase, uuid).map_err(luks_err(&dst.path))?;
    dst.reopen()?;
    let dst_payload = header.payload_bytes();

    let extents = data_extents(src, src_payload, len).map_err(io(&dst.path, "cannot map"))?;
    let chunks: Vec<(u64, u64)> = extents
        .iter()
        .flat_map(|&(start, end)| {
            (start..end)
                .step_by(CHUNK as usize)
                .map(move |o| (o, (o + CHUNK).min(end)))
        })
        .collect();
    let total: u64 = chunks.iter().map(|(a, b)| b - a).sum();
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let bar = progress_bar(total);
    let t = Instant::now();
    let out = &dst.file;
    let results: Vec<Result<(), CommandError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    reencrypt(
                        src,
                        out,
                        (src_payload, dst_payload),
                        (old_key, &new_key),
                        &chunks,
                        &next,
                        &done,
                    )
                    .map_err(|e| CommandError::Invalid(format!("re-encrypting: {e}")))
                })
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            bar.set_position(done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("re-encryption thread panicked"))
            .collect()
    });
    bar.finish_and_clear();
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    dst.file.sync_all().map_err(io(&dst.path, "cannot sync"))?;
    Ok(format!(
        "deep: new data key, re-encrypted {:.1} MiB of data in {secs:.2} s ({:.2} GB/s on \
         {workers} threads), synced to disk in {:.2} s",
        total as f64 / (1 << 20) as f64,
        total as f64 / secs.max(1e-9) / 1e9,
        t.elapsed().as_secs_f64()
    ))
}

/// One worker: takes chunks until none is left; decrypts each with the
/// old key and encrypts it with the new one at the same sector.
fn reencrypt(
    src: &File,
    dst: &File,
    (src_payload, dst_payload): (u64, u64),
    (old_key, new_key): (&MasterKey, &MasterKey),
    chunks: &[(u64, u64)],
    next: &AtomicUsize,
    done: &AtomicU64,
) -> io::Result<()> {
    let mut old = Xts::new(old_key).map_err(io::Error::other)?;
    let mut new = Xts::new(new_key).map_err(io::Error::other)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let r = (|| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(start, end)) = chunks.get(i) else {
            return Ok(());
        };
        let b = &mut buf[..(end - start) as usize];
        src.read_exact_at(b, start)?;
        let rel = start - src_payload;
        let first = rel / SECTOR as u64;
        old.decrypt_in_place(first, b).map_err(io::Error::other)?;
        new.encrypt_in_place(first, b).map_err(io::Error::other)?;
        dst.write_all_at(b, dst_payload + rel)?;
        done.fetch_add(end - start, Ordering::Relaxed);
    })();
    // Plaintext passed through this buffer.
    buf.zeroize();
    r
}

/// The data extents of `file` between `from` and `end`, sector aligned
/// (SEEK_DATA / SEEK_HOLE: holes are left out).
fn data_extents(file: &File, from: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let sector = SECTOR as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = from;
    while at < end {
        let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let start = from + (data - from) / sector * sector;
        let stop = (from + (hole - from).div_ceil(sector) * sector).min(end);
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(stop),
            _ => out.push((start, stop)),
        }
        at = hole;
    }
    Ok(out)
}

/// lseek with SEEK_DATA or SEEK_HOLE; None past the last data (ENXIO).
fn seek(file: &File, at: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor with integer arguments.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// Makes `dst` a copy of `src`: a reflink where the file system allows,
/// else the data extents copied in the kernel (holes stay holes).
fn copy_file(src: &File, dst: &File, path: &Path) -> Result<&'static str, CommandError> {
    if crate::storage::reflink(src, dst).is_ok() {
        return Ok("reflinked");
    }
    let len = src.metadata().map_err(io(path, "cannot stat"))?.len();
    dst.set_len(len).map_err(io(path, "cannot size"))?;
    let extents = data_extents(src, 0, len).map_err(io(path, "cannot map"))?;
    let total: u64 = extents.iter().map(|(a, b)| b - a).sum();
    let bar = progress_bar(total);
    let mut copied = 0;
    for (start, end) in extents {
        let mut at = start;
        while at < end {
            let (mut from, mut to) = (at as libc::loff_t, at as libc::loff_t);
            let want = ((end - at).min(CHUNK)) as usize;
            // SAFETY: both descriptors are open; the offsets are ours.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut from,
                    dst.as_raw_fd(),
                    &mut to,
                    want,
                    0,
                )
            };
            if n <= 0 {
                let e = if n == 0 {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early")
                } else {
                    io::Error::last_os_error()
                };
                return Err(CommandError::Io {
                    path: path.into(),
                    what: "cannot copy",
                    source: e,
                });
            }
            at += n as u64;
            copied += n as u64;
            bar.set_position(copied);
        }
    }
    bar.finish_and_clear();
    dst.sync_all().map_err(io(path, "cannot sync"))?;
    Ok("copied (no reflinks here)")
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

/// `DST.partial`: where DST is built.
fn partial_path(dst: &Path) -> PathBuf {
    let mut p = dst.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// The file DST is built in, removed unless `finish` renames it.
struct Partial {
    path: PathBuf,
    file: File,
    done: bool,
}

impl Partial {
    fn new(path: &Path) -> Result<Partial, CommandError> {
        let file = Self::create(path)?;
        Ok(Partial {
            path: path.into(),
            file,
            done: false,
        })
    }

    fn create(path: &Path) -> Result<File, CommandError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    CommandError::Invalid(format!(
                        "{}: exists (left by an interrupted clone?); remove it first",
                        path.display()
                    ))
                } else {
                    CommandError::Io {
                        path: path.into(),
                        what: "cannot create",
                        source: e,
                    }
                }
            })
    }

    /// Removes the empty file so that another step can create it.
    fn release_file(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn reopen(&mut self) -> Result<(), CommandError> {
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(io(&self.path, "cannot open"))?;
        Ok(())
    }

    /// Syncs, renames to `dst` and makes the name durable.
    fn finish(&mut self, dst: &Path) -> Result<(), CommandError> {
        self.file
            .sync_all()
            .map_err(io(&self.path, "cannot sync"))?;
        // Never over a DST that appeared since the start.
        rename_noreplace(&self.path, dst).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                CommandError::Invalid(format!(
                    "{}: created by someone else during the clone; it is not replaced",
                    dst.display()
                ))
            } else {
                io(dst, "cannot rename the finished copy to")(e)
            }
        })?;
        self.done = true;
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "cannot sync"))
    }
}

/// `rename` that fails with EEXIST instead of replacing `to`.
fn rename_noreplace(from_path: &Path, to_path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (from, to) = (c(from_path)?, c(to_path)?);
    // SAFETY: NUL-terminated paths relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A file system without RENAME_NOREPLACE (NFS): a hard link is
        // no-replace too, then the old name goes.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::hard_link(from_path, to_path)?;
            std::fs::remove_file(from_path)
        }
        _ => Err(e),
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A shared lock on SRC: a daemon that runs a device on it holds an
/// exclusive one, and its data would change under the copy.
fn lock_shared(file: &File, path: &Path) -> Result<(), CommandError> {
    // SAFETY: flock on a valid, open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    Err(CommandError::Invalid(format!(
        "{}: a running vmcrypt serves it to a guest (it holds the image lock); take a snapshot \
         (`vmcrypt ctl --control PATH snapshot path=...`) and clone that",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_skip_holes_and_stay_sector_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 32 << 20).unwrap();
        let e = data_extents(&f, 2 << 20, 64 << 20).unwrap();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].0 <= 8 << 20 && e[0].1 >= (8 << 20) + 4096, "{e:?}");
        assert!(e[1].0 <= 32 << 20 && e[1].1 >= (32 << 20) + 8192, "{e:?}");
        for (a, b) in &e {
            assert_eq!((a - (2 << 20)) % SECTOR as u64, 0);
            assert_eq!((b - (2 << 20)) % SECTOR as u64, 0);
        }
        // A file with no data at all.
        let g = File::create(dir.path().join("g")).unwrap();
        g.set_len(1 << 20).unwrap();
        assert!(data_extents(&g, 0, 1 << 20).unwrap().is_empty());
    }
}
