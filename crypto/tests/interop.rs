//! The LUKS1 format and the XTS engine against independent implementations:
//! cryptsetup and QEMU (qemu-img, qemu-io).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vmcrypt_crypto::{luks, Luks, Passphrase, Xts};

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn pass() -> Passphrase {
    Passphrase::from_kek(&[0x5c; 32])
}

fn keyfile(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("key");
    std::fs::write(&p, pass().as_bytes()).unwrap();
    p
}

#[test]
fn cryptsetup_accepts_our_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let (header, _) = luks::create(&img, 16 << 20, &pass()).unwrap();
    let (ok, dump) = run(Command::new("cryptsetup").arg("luksDump").arg(&img));
    assert!(ok, "{dump}");
    assert!(
        dump.contains("Version:       \t1") || dump.contains("Version:"),
        "{dump}"
    );
    assert!(
        dump.contains("aes") && dump.contains("xts-plain64") && dump.contains("sha256"),
        "{dump}"
    );
    assert!(dump.contains(&header.uuid), "{dump}");
    assert!(dump.contains("Payload offset:\t4096"), "{dump}");
    let key = keyfile(dir.path());
    let (ok, out) = run(Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&img));
    assert!(ok, "{out}");
    std::fs::write(&key, b"wrong").unwrap();
    let (ok, _) = run(Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&img));
    assert!(!ok);
}

#[test]
fn we_open_images_made_by_cryptsetup_and_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path());
    let a = dir.path().join("cryptsetup.img");
    std::fs::File::create(&a)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let (ok, out) = run(Command::new("cryptsetup")
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
        .arg(&key)
        .arg(&a));
    assert!(ok, "{out}");
    let b = dir.path().join("qemu.img");
    // qemu-img times 32768 PBKDF2 rounds to pick its iteration count and
    // gives up ("Unable to get accurate CPU usage") when its thread's user
    // time did not move. With SHA-256 (SHA-NI) that probe takes about a
    // millisecond here and failed up to every time on a loaded machine; the
    // SHA-512 probe is several times longer and did not fail. Retry anyway.
    let mut out = String::new();
    let mut made = false;
    for _ in 0..5 {
        let _ = std::fs::remove_file(&b);
        let (ok, text) = run(Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object"])
            .arg(format!("secret,id=s0,file={}", key.display()))
            .args(["-o", "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512,iter-time=200"])
            .arg(&b)
            .arg("16M"));
        out = text;
        if ok {
            made = true;
            break;
        }
    }
    assert!(made, "qemu-img create failed: {out}");
    for img in [a, b] {
        let f = std::fs::File::open(&img).unwrap();
        let l = Luks::open(&f, &img).unwrap();
        assert!(l.unlock(&pass()).is_ok(), "{}", img.display());
    }
}

#[test]
fn data_encrypted_here_reads_back_in_qemu_and_vice_versa() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let (header, mk) = luks::create(&img, 16 << 20, &pass()).unwrap();
    let key = keyfile(dir.path());
    let mut xts = Xts::new(&mk).unwrap();
    // We write 0xab at payload bytes 1 MiB .. +64 KiB; qemu-io checks it.
    let mut buf = vec![0xabu8; 65536];
    xts.encrypt_in_place((1 << 20) / 512, &mut buf).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&buf, header.payload_bytes() + (1 << 20))
        .unwrap();
    let qemu_io = |cmd: &str| {
        run(Command::new("qemu-io")
            .arg("--object")
            .arg(format!("secret,id=s0,file={}", key.display()))
            .arg("--image-opts")
            .arg(format!(
                "driver=luks,key-secret=s0,file.filename={}",
                img.display()
            ))
            .args(["-c", cmd]))
    };
    let (ok, out) = qemu_io("read -P 0xab 1M 64k");
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
    // qemu-io writes 0xcd at 4 MiB; we decrypt it.
    let (ok, out) = qemu_io("write -P 0xcd 4M 8k");
    assert!(ok, "{out}");
    let mut back = vec![0u8; 8192];
    f.read_exact_at(&mut back, header.payload_bytes() + (4 << 20))
        .unwrap();
    assert!(back.iter().any(|&b| b != 0xcd), "qemu wrote plaintext?");
    xts.decrypt_in_place((4 << 20) / 512, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0xcd));
}
