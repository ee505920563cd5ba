//! Encrypted images end to end: `vmcrypt create`, `serve` driven by libblkio,
//! and qemu-img, qemu-io and cryptsetup as independent checkers of the
//! on-disk format.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    keys: PathBuf,
}

impl Setup {
    fn new(size: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let keys = dir.path().join("keys");
        let out = vmcrypt(&[
            "create",
            img.to_str().unwrap(),
            "--size",
            size,
            "--keystore",
            keys.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Setup { dir, img, keys }
    }

    fn serve(&self, name: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["--image", self.img.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::start(self.dir.path(), name, &args)
    }

    fn export(&self) -> PathBuf {
        let out_path = self.dir.path().join("passphrase");
        let _ = std::fs::remove_file(&out_path);
        let out = vmcrypt(&[
            "export-passphrase",
            self.img.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out_path
    }
}

fn vmcrypt(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn qemu_io(img: &Path, pass: &Path, cmd: &str) -> (bool, String) {
    let out = Command::new("qemu-io")
        .arg("--object")
        .arg(format!("secret,id=s0,file={}", pass.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ))
        .args(["-c", cmd])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed"),
        text,
    )
}

#[test]
fn data_written_through_vmcrypt_reads_back_in_qemu_io_and_the_other_way() {
    written_through_vmcrypt_reads_back_in_qemu_io(&[]);
}

/// The same with `--cache none` (O_DIRECT under the encrypt filter's
/// aligned bounce buffers).
#[test]
fn with_cache_none_data_reads_back_in_qemu_io_and_the_other_way() {
    written_through_vmcrypt_reads_back_in_qemu_io(&["--cache", "none"]);
}

fn written_through_vmcrypt_reads_back_in_qemu_io(extra: &[&str]) {
    let s = Setup::new("32M");
    let d = s.serve("a", extra);
    let mut f = Frontend::connect(&d.socket, 1, 2 * MIB as usize);
    assert_eq!(f.capacity, 32 * MIB);
    // 0xab over 64 KiB at 1 MiB, written as a 3-segment request.
    f.buf(0, 65536).fill(0xab);
    let iov = |p: *mut u8, len| libc::iovec {
        iov_base: p.cast(),
        iov_len: len,
    };
    let w = [
        iov(f.ptr(0), 1536),
        iov(f.ptr(1536), 31232),
        iov(f.ptr(32768), 32768),
    ];
    f.queues[0].writev(MIB, w.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    // Reading it back through vmcrypt gives the plaintext.
    assert_eq!(f.read(0, MIB, MIB as usize, 65536), 0);
    assert!(f.buf(MIB as usize, 65536).iter().all(|&b| b == 0xab));
    drop(f);
    assert!(d.terminate().success());

    let pass = s.export();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&pass).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let (ok, out) = qemu_io(&s.img, &pass, "read -P 0xab 1M 64k");
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&s.img, &pass, "write -P 0xcd 8M 128k");
    assert!(ok, "{out}");

    let d = s.serve("b", extra);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.read(0, 8 * MIB, 0, 131072), 0);
    assert!(f.buf(0, 131072).iter().all(|&b| b == 0xcd));
}

/// Large reads whose ciphertext is in the host's page cache are decrypted
/// straight from a mapping of the image, skipping io_uring: the same
/// plaintext, into scattered guest buffers at odd addresses too. Small
/// reads, and large ones whose pages are not cached, still go through
/// io_uring. The daemon's report at exit counts the former.
#[test]
fn large_cached_reads_are_decrypted_straight_from_the_page_cache() {
    const K: usize = 1024;
    let s = Setup::new("32M");
    let d = s.serve("a", &[]);
    let mut f = Frontend::connect(&d.socket, 1, 4 * MIB as usize);
    let data = pattern(7, 512 * K);
    f.buf(0, 512 * K).copy_from_slice(&data);
    assert_eq!(f.write(0, 3 * MIB, 0, 512 * K), 0);
    // 1: 256 KiB at once.
    assert_eq!(f.read(0, 3 * MIB, MIB as usize, 256 * K), 0);
    assert_eq!(f.buf(MIB as usize, 256 * K), &data[..256 * K]);
    // 2: 128 KiB into three buffers at odd addresses that split sectors.
    let base = 2 * MIB as usize;
    let segs = [(1, 1000), (2001, 70000), (80001, 128 * K - 71000)];
    let iovs: Vec<libc::iovec> = segs
        .iter()
        .map(|&(off, len)| libc::iovec {
            iov_base: f.ptr(base + off).cast(),
            iov_len: len,
        })
        .collect();
    f.queues[0].readv(
        3 * MIB + 256 * K as u64,
        iovs.as_ptr(),
        3,
        0,
        ReqFlags::empty(),
    );
    assert_eq!(f.wait(0), 0);
    let mut got = Vec::new();
    for &(off, len) in &segs {
        got.extend_from_slice(f.buf(base + off, len));
    }
    assert_eq!(got, &data[256 * K..384 * K]);
    // Too small to be worth the mapping: through io_uring.
    assert_eq!(f.read(0, 3 * MIB + 4096, 3 * MIB as usize, 4096), 0);
    assert_eq!(f.buf(3 * MIB as usize, 4096), &data[4096..8192]);
    // Not in the page cache: through io_uring.
    let other = pattern(8, 128 * K);
    f.buf(0, 128 * K).copy_from_slice(&other);
    assert_eq!(f.write(0, 8 * MIB, 0, 128 * K), 0);
    assert_eq!(f.flush(0), 0);
    let img = std::fs::File::open(&s.img).unwrap();
    let payload = 2 * MIB; // vmcrypt create's LUKS payload offset
                           // SAFETY: fadvise on a valid descriptor; the pages are clean (flushed).
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&img),
            (payload + 8 * MIB) as i64,
            128 * K as i64,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    if let Some(st) = cachestat(&img, payload + 8 * MIB) {
        assert_eq!(st.cache, 0, "the written range left the page cache");
    }
    f.buf(MIB as usize, 128 * K).fill(0);
    assert_eq!(f.read(0, 8 * MIB, MIB as usize, 128 * K), 0);
    assert_eq!(f.buf(MIB as usize, 128 * K), &other[..]);
    drop(f);
    let log_path = d.log.clone();
    assert!(d.terminate().success());
    let log = std::fs::read_to_string(log_path).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("reads decrypted straight from the page cache"))
        .unwrap_or_else(|| panic!("no report in:\n{log}"));
    assert!(
        line.contains("reads=2 ") && line.contains(&format!("bytes={}", 384 * K)),
        "{line}"
    );
}

#[test]
fn cryptsetup_opens_our_images_with_the_exported_passphrase() {
    let s = Setup::new("16M");
    let out = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(&s.img)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && dump.contains("xts-plain64")
            && dump.contains("Payload offset:\t4096"),
        "{dump}"
    );
    let pass = s.export();
    let st = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&pass)
        .arg(&s.img)
        .status()
        .unwrap();
    assert!(st.success());
    // A second export refuses to overwrite the file.
    let out = vmcrypt(&[
        "export-passphrase",
        s.img.to_str().unwrap(),
        "--output",
        pass.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
}

#[test]
fn images_made_by_qemu_img_and_cryptsetup_are_served_with_a_passphrase_file() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, b"correct horse battery staple").unwrap();
    let q = dir.path().join("qemu.img");
    // qemu-img's PBKDF2 timing probe fails ("Unable to get accurate CPU
    // usage") when it runs in under a tick of user time, as SHA-256 often does
    // on a loaded machine; SHA-512 takes long enough. Retry anyway.
    let mut made = String::new();
    let mut ok = false;
    for _ in 0..5 {
        let _ = std::fs::remove_file(&q);
        let st = Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object"])
            .arg(format!("secret,id=s0,file={}", pass.display()))
            .args(["-o", "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512,iter-time=200"])
            .arg(&q)
            .arg("16M")
            .output()
            .unwrap();
        made = String::from_utf8_lossy(&st.stderr).into_owned();
        if st.status.success() {
            ok = true;
            break;
        }
    }
    assert!(ok, "qemu-img create failed: {made}");
    let c = dir.path().join("cryptsetup.img");
    std::fs::File::create(&c)
        .unwrap()
        .set_len(18 * MIB)
        .unwrap();
    let st = Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "512",
            "--hash",
            "sha256",
            "--iter-time",
            "10",
            "--key-file",
        ])
        .arg(&pass)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    for (i, img) in [q, c].iter().enumerate() {
        let (ok, out) = qemu_io(img, &pass, "write -P 0x3c 0 64k");
        assert!(ok, "{out}");
        let d = Daemon::start(
            dir.path(),
            &format!("d{i}"),
            &[
                "--image",
                img.to_str().unwrap(),
                "--passphrase-file",
                pass.to_str().unwrap(),
            ],
        );
        let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
        assert_eq!(f.capacity, 16 * MIB, "{}", img.display());
        assert_eq!(f.read(0, 0, 0, 65536), 0);
        assert!(
            f.buf(0, 65536).iter().all(|&b| b == 0x3c),
            "{}",
            img.display()
        );
        f.buf(0, 4096).fill(0x99);
        assert_eq!(f.write(0, 12 * MIB, 0, 4096), 0);
        drop(f);
        assert!(d.terminate().success());
        let (ok, out) = qemu_io(img, &pass, "read -P 0x99 12M 4k");
        assert!(ok, "{out}");
    }
}

#[test]
fn no_plaintext_at_rest_and_equal_blocks_differ() {
    let s = Setup::new("16M");
    let d = s.serve("a", &["--num-queues", "2"]);
    let mut f = Frontend::connect(&d.socket, 2, 2 * MIB as usize);
    // The same recognisable 512-byte block in 2048 sectors (1 MiB).
    let mut block = [0u8; 512];
    for (i, b) in block.iter_mut().enumerate() {
        *b = b"VMCRYPT-PLAINTEXT-MARKER "[i % 25];
    }
    for c in f.buf(0, MIB as usize).chunks_mut(512) {
        c.copy_from_slice(&block);
    }
    assert_eq!(f.write(0, 0, 0, MIB as usize), 0);
    assert_eq!(f.write(1, 5 * MIB, 0, MIB as usize), 0);
    assert_eq!(f.flush(0), 0);
    drop(f);
    assert!(d.terminate().success());
    let raw = std::fs::read(&s.img).unwrap();
    let payload = &raw[2 * MIB as usize..];
    let marker = b"VMCRYPT-PLAINTEXT-MARKER";
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker),
        "plaintext found in the image"
    );
    let mut seen = std::collections::HashSet::new();
    for s in payload[..MIB as usize]
        .chunks(512)
        .chain(payload[5 * MIB as usize..6 * MIB as usize].chunks(512))
    {
        assert!(seen.insert(s.to_vec()), "two sectors have equal ciphertext");
    }
    // Nor does the key store's key appear in the image or the descriptor.
    for k in std::fs::read_dir(&s.keys).unwrap() {
        let key = std::fs::read(k.unwrap().path()).unwrap();
        assert!(!raw.windows(32).any(|w| w == key.as_slice()));
        let hexkey = hex_of(&key);
        assert!(
            !std::fs::read_to_string(s.img.with_extension("img.vmcrypt"))
                .unwrap()
                .contains(&hexkey)
        );
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn write_zeroes_and_discard_on_an_encrypted_disk() {
    let s = Setup::new("16M");
    let d = s.serve("a", &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 262144).fill(0xee);
    assert_eq!(f.write(0, 0, 0, 262144), 0);
    for flags in [ReqFlags::empty(), ReqFlags::NO_UNMAP] {
        f.queues[0].write_zeroes(65536, 65536, 0, flags);
        assert_eq!(f.wait(0), 0);
        assert_eq!(f.read(0, 0, 0, 262144), 0);
        let back = f.buf(0, 262144);
        assert!(back[..65536].iter().all(|&b| b == 0xee));
        assert!(
            back[65536..131072].iter().all(|&b| b == 0),
            "write-zeroes must read back zeroes"
        );
        assert!(back[131072..].iter().all(|&b| b == 0xee));
        f.buf(0, 262144).fill(0xee);
        assert_eq!(f.write(0, 0, 0, 262144), 0);
    }
    f.queues[0].discard(MIB, MIB, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    // Reads of discarded blocks succeed (their content is unspecified).
    assert_eq!(f.read(0, MIB, 0, 4096), 0);
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn serve_fails(dir: &Path, args: &[&str], want: &str) {
    let out = Command::new(bin())
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("x.sock"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} started");
    assert!(err.contains(want), "{args:?}: want '{want}' in: {err}");
    assert!(
        err.lines()
            .last()
            .unwrap_or("")
            .starts_with("vmcrypt: error:"),
        "{err}"
    );
}

#[test]
fn wrong_keys_and_bad_headers_fail_cleanly_and_change_nothing() {
    let s = Setup::new("8M");
    let img = s.img.to_str().unwrap();
    let dir = s.dir.path();
    let before = sha(&s.img);

    // Wrong passphrase file.
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, b"not it").unwrap();
    serve_fails(
        dir,
        &["--image", img, "--passphrase-file", wrong.to_str().unwrap()],
        "no key slot opens",
    );
    // Wrong KEK in the key store.
    let key_file = std::fs::read_dir(&s.keys)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good_key = std::fs::read(&key_file).unwrap();
    std::fs::write(&key_file, [0x11u8; 32]).unwrap();
    serve_fails(dir, &["--image", img], "no key slot opens");
    // Missing key.
    std::fs::remove_file(&key_file).unwrap();
    serve_fails(dir, &["--image", img], "not found");
    // A key file others can read is refused, as ssh refuses such keys.
    std::fs::write(&key_file, &good_key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    serve_fails(dir, &["--image", img], "chmod 600");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Missing descriptor.
    let desc = dir.join("disk.img.vmcrypt");
    let desc_text = std::fs::read(&desc).unwrap();
    std::fs::remove_file(&desc).unwrap();
    serve_fails(dir, &["--image", img], "no key descriptor");
    std::fs::write(&desc, &desc_text).unwrap();
    assert_eq!(sha(&s.img), before, "a failed start changed the image");

    // Corrupt and truncated headers, on copies.
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "magic",
            Box::new(|b: &mut Vec<u8>| b[0] = b'X'),
            "has no LUKS header, but its key descriptor",
        ),
        ("version", Box::new(|b: &mut Vec<u8>| b[7] = 9), "version 9"),
        (
            "cipher",
            Box::new(|b: &mut Vec<u8>| b[8..11].copy_from_slice(b"des")),
            "unsupported LUKS cipher",
        ),
        (
            "truncated header",
            Box::new(|b: &mut Vec<u8>| b.truncate(300)),
            "truncated",
        ),
        (
            "truncated slots",
            Box::new(|b: &mut Vec<u8>| b.truncate(100 * 1024)),
            "truncated",
        ),
        (
            "costly slot",
            Box::new(|b: &mut Vec<u8>| b[212..216].copy_from_slice(&u32::MAX.to_be_bytes())),
            "asks for 4294967295 PBKDF2 iterations",
        ),
        (
            "slot material",
            Box::new(|b: &mut Vec<u8>| b[8 * 512 + 7] ^= 1),
            "no key slot opens",
        ),
    ];
    for (name, damage, want) in cases {
        let mut bytes = before.clone();
        damage(&mut bytes);
        let copy = dir.join(format!("bad-{}.img", name.replace(' ', "-")));
        std::fs::write(&copy, &bytes).unwrap();
        std::fs::copy(&desc, format!("{}.vmcrypt", copy.display())).unwrap();
        let copy_str = copy.to_str().unwrap().to_string();
        // A damaged magic is not a raw image: the descriptor says LUKS.
        serve_fails(dir, &["--image", &copy_str], want);
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            bytes,
            "{name}: image changed"
        );
    }
    assert_eq!(sha(&s.img), before);
}

/// What is served is decided by the operator's configuration, never by the
/// image's bytes, which the guest may have written.
#[test]
fn the_configuration_decides_raw_or_luks_never_the_bytes() {
    let s = Setup::new("8M");
    let img = s.img.to_str().unwrap();
    let dir = s.dir.path();
    // An encrypted image with its descriptor is never served raw.
    serve_fails(dir, &["--image", img, "--format", "raw"], "would hand its");
    // A raw disk with a LUKS header the guest wrote (its own encryption):
    // refused without configuration, served raw with --format raw, and the
    // guest sees its own bytes.
    let raw = dir.join("guest-luks.img");
    let mut bytes = std::fs::read(&s.img).unwrap();
    bytes.truncate(4 * MIB as usize);
    std::fs::write(&raw, &bytes).unwrap();
    let raw_str = raw.to_str().unwrap();
    serve_fails(dir, &["--image", raw_str], "--format raw to serve it raw");
    serve_fails(
        dir,
        &["--image", raw_str, "--format", "luks"],
        "no key descriptor",
    );
    let d = Daemon::start(dir, "raw", &["--image", raw_str, "--format", "raw"]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 4 * MIB);
    assert_eq!(f.read(0, 0, 0, 4096), 0);
    assert_eq!(f.buf(0, 4096), &bytes[..4096]);
    drop(f);
    drop(d);
    // A raw image without a header: --format luks and --passphrase-file are
    // refused, and nothing is written.
    let plain = dir.join("plain.img");
    std::fs::write(&plain, vec![0u8; MIB as usize]).unwrap();
    let plain_str = plain.to_str().unwrap();
    serve_fails(
        dir,
        &["--image", plain_str, "--format", "luks"],
        "has no LUKS header, but --format luks",
    );
    let pass = dir.join("pass");
    std::fs::write(&pass, b"x").unwrap();
    serve_fails(
        dir,
        &[
            "--image",
            plain_str,
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        "has no LUKS header, but --passphrase-file",
    );
    assert_eq!(std::fs::read(&plain).unwrap(), vec![0u8; MIB as usize]);
}

/// Two header changes never interleave: rekey takes a lock on the header
/// block (as qemu-img's locks sit there too) and refuses while another
/// holds it, changing nothing; once free it rekeys.
#[test]
fn rekey_waits_its_turn_for_the_header() {
    use std::os::fd::AsRawFd;
    let s = Setup::new("8M");
    let img = s.img.to_str().unwrap();
    let keys = s.keys.to_str().unwrap();
    let before = sha(&s.img);
    let desc = std::fs::read(s.dir.path().join("disk.img.vmcrypt")).unwrap();
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&s.img)
        .unwrap();
    // SAFETY: a zeroed flock is valid; we set the fields that matter.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 100;
    fl.l_len = 1;
    // SAFETY: an open fd and a flock we own.
    let r = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(r, 0);
    let out = vmcrypt(&["rekey", img, "--keystore", keys]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is using the LUKS header"), "{err}");
    assert_eq!(sha(&s.img), before);
    assert_eq!(
        std::fs::read(s.dir.path().join("disk.img.vmcrypt")).unwrap(),
        desc
    );
    drop(holder);
    let out = vmcrypt(&["rekey", img, "--keystore", keys]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        std::fs::read(s.dir.path().join("disk.img.vmcrypt")).unwrap(),
        desc
    );
    let d = s.serve("after", &[]);
    drop(d);
}

#[test]
fn info_shows_the_image_and_no_secret() {
    let s = Setup::new("8M");
    let out = vmcrypt(&["info", s.img.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "LUKS1",
        "aes-xts-plain64",
        "4096 sectors",
        "capacity:       8388608",
        "[0] in use",
        "key provider:   local",
        "key id:",
    ] {
        assert!(text.contains(want), "missing '{want}' in:\n{text}");
    }
    let key = std::fs::read(
        std::fs::read_dir(&s.keys)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(!text.contains(&hex_of(&key)));
}
