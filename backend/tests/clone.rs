//! `vmcrypt clone`: shallow (same data key, new KEK) and deep (new data
//! key, re-encrypted) copies, checked with cryptsetup and read back
//! through vmcrypt.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const MIB: u64 = 1 << 20;
/// Where the test writes: the first and last blocks and some in between.
const OFFSETS: [u64; 4] = [0, 5 * MIB + 4096, 33 * MIB, 64 * MIB - 8192];
const LEN: usize = 8192;

fn vmcrypt(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An encrypted 64 MiB image with a pattern at each of `OFFSETS`.
fn written_image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("src.img");
    let keys = dir.join("keys");
    ok(vmcrypt(&[
        "create",
        img.to_str().unwrap(),
        "--size",
        "64M",
        "--keystore",
        keys.to_str().unwrap(),
    ]));
    let d = Daemon::start(dir, "src", &["--image", img.to_str().unwrap()]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    for (i, &off) in OFFSETS.iter().enumerate() {
        f.buf(0, LEN).copy_from_slice(&pattern(i as u64 + 1, LEN));
        assert_eq!(f.write(0, off, 0, LEN), 0);
    }
    drop(f);
    assert!(d.terminate().success());
    (img, keys)
}

/// Serves `img` (its own key descriptor) and checks every pattern.
fn reads_back(dir: &Path, img: &Path, name: &str) {
    let d = Daemon::start(dir, name, &["--image", img.to_str().unwrap()]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 64 * MIB);
    for (i, &off) in OFFSETS.iter().enumerate() {
        assert_eq!(f.read(0, off, 0, LEN), 0);
        assert_eq!(
            f.buf(0, LEN),
            &pattern(i as u64 + 1, LEN)[..],
            "{name} at {off}"
        );
    }
}

/// cryptsetup's view: (MK digest, UUID, enabled key slots).
fn luks_dump(img: &Path) -> (String, String, usize) {
    let out = Command::new("cryptsetup")
        .args(["luksDump", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text = ok(out);
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .to_string()
    };
    let slots = text.lines().filter(|l| l.ends_with(": ENABLED")).count();
    (field("MK digest"), field("UUID"), slots)
}

/// The key-slot passphrase of `img`, as a file (for cryptsetup).
fn passphrase(dir: &Path, img: &Path, keys: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.pass",
        img.file_name().unwrap().to_str().unwrap()
    ));
    ok(vmcrypt(&[
        "export-passphrase",
        img.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--keystore",
        keys.to_str().unwrap(),
    ]));
    out
}

fn opens_with(img: &Path, pass: &Path) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(pass)
        .arg(img)
        .status()
        .unwrap()
        .success()
}

#[test]
fn shallow_clone_keeps_the_data_key_with_a_new_kek() {
    let dir = tempfile::tempdir().unwrap();
    let (src, keys) = written_image(dir.path());
    let dst = dir.path().join("shallow.img");
    let text = ok(vmcrypt(&[
        "clone",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--keystore",
        keys.to_str().unwrap(),
    ]));
    assert!(text.contains("shallow: same data key"), "{text}");
    let (src_mk, src_uuid, _) = luks_dump(&src);
    let (dst_mk, dst_uuid, dst_slots) = luks_dump(&dst);
    assert_eq!(src_mk, dst_mk, "the data key changed");
    assert_ne!(src_uuid, dst_uuid, "the clone shares the UUID");
    assert_eq!(dst_slots, 1);
    // DST opens only with its own key: SRC's passphrase does not open it.
    let src_pass = passphrase(dir.path(), &src, &keys);
    let dst_pass = passphrase(dir.path(), &dst, &keys);
    assert!(opens_with(&dst, &dst_pass));
    assert!(!opens_with(&dst, &src_pass), "SRC's key opens the clone");
    assert!(opens_with(&src, &src_pass));
    assert!(!dir.path().join("shallow.img.partial").exists());
    reads_back(dir.path(), &dst, "shallow");
}

#[test]
fn deep_clone_re_encrypts_with_a_new_data_key() {
    let dir = tempfile::tempdir().unwrap();
    let (src, keys) = written_image(dir.path());
    let dst = dir.path().join("deep.img");
    let text = ok(vmcrypt(&[
        "clone",
        "--deep",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--keystore",
        keys.to_str().unwrap(),
    ]));
    assert!(text.contains("deep: new data key"), "{text}");
    let (src_mk, src_uuid, _) = luks_dump(&src);
    let (dst_mk, dst_uuid, _) = luks_dump(&dst);
    assert_ne!(src_mk, dst_mk, "the data key is the same");
    assert_ne!(src_uuid, dst_uuid);
    // Both payloads start at 2 MiB: the ciphertext differs at each offset.
    let (s, d) = (
        std::fs::File::open(&src).unwrap(),
        std::fs::File::open(&dst).unwrap(),
    );
    for &off in &OFFSETS {
        let (mut a, mut b) = (vec![0u8; LEN], vec![0u8; LEN]);
        s.read_exact_at(&mut a, 2 * MIB + off).unwrap();
        d.read_exact_at(&mut b, 2 * MIB + off).unwrap();
        assert_ne!(a, b, "same ciphertext at {off}");
    }
    let dst_pass = passphrase(dir.path(), &dst, &keys);
    assert!(opens_with(&dst, &dst_pass));
    reads_back(dir.path(), &dst, "deep");
}

#[test]
fn clone_refuses_what_it_must_not_do() {
    let dir = tempfile::tempdir().unwrap();
    let (src, keys) = written_image(dir.path());
    let k = keys.to_str().unwrap();
    // DST exists.
    let out = vmcrypt(&[
        "clone",
        src.to_str().unwrap(),
        src.to_str().unwrap(),
        "--keystore",
        k,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // SRC is being served to a frontend (its device runs).
    let d = Daemon::start(dir.path(), "busy", &["--image", src.to_str().unwrap()]);
    let f = Frontend::connect(&d.socket, 1, MIB as usize);
    let dst = dir.path().join("busy-clone.img");
    let out = vmcrypt(&[
        "clone",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--keystore",
        k,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("snapshot"), "{err}");
    assert!(!dst.exists() && !dir.path().join("busy-clone.img.partial").exists());
    drop(f);
    drop(d);
    // --deep needs an encrypted image; a raw one is copied as it is.
    let raw = sparse_image(dir.path(), 8 * MIB);
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&pattern(9, 4096), 4 * MIB)
        .unwrap();
    let copy = dir.path().join("raw-copy.img");
    let out = vmcrypt(&[
        "clone",
        "--deep",
        raw.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not encrypted"));
    ok(vmcrypt(&[
        "clone",
        raw.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&copy).unwrap());
}
