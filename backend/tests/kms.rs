//! Keys from real KMIP servers (PyKMIP over mutual TLS): create, serve,
//! failover, revocation, refused clients, unreachable servers, rekey, and
//! no key material in the logs.

mod common;
#[path = "../../kms/tests/support/mod.rs"]
mod kms_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kms_support::*;
use vmcrypt::keys::KeyDescriptor;
use vmcrypt_crypto::{Luks, Passphrase};
use vmcrypt_kms::{Kek, KeyProvider, KeyState, KmipProvider};

const MIB: u64 = 1 << 20;

fn vmcrypt(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn create(dir: &Path, conf: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    let out = vmcrypt(&[
        "create",
        img.to_str().unwrap(),
        "--size",
        "16M",
        "--kms",
        conf.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// `vmcrypt serve` of `img` with the KEK from the KMS in `conf`.
fn serve_kms(dir: &Path, name: &str, img: &Path, conf: &Path) -> Daemon {
    Daemon::start(
        dir,
        name,
        &[
            "--image",
            img.to_str().unwrap(),
            "--kms",
            conf.to_str().unwrap(),
        ],
    )
}

fn descriptor(img: &Path) -> KeyDescriptor {
    KeyDescriptor::load(img).unwrap().unwrap()
}

fn provider(conf: &Path) -> KmipProvider {
    KmipProvider::from_file(conf, Duration::from_secs(5)).unwrap()
}

fn ops(server: &KmsServer) -> (usize, Vec<String>) {
    let log = std::fs::read_to_string(server.db_dir.join(format!("server-{}.log", server.port)))
        .unwrap_or_default();
    let conns = log.matches("Receiving incoming connection").count();
    let ops = log
        .lines()
        .filter_map(|l| l.split("Processing operation: ").nth(1).map(str::to_string))
        .collect();
    (conns, ops)
}

fn serve_fails(dir: &Path, args: &[&str]) -> (String, Duration) {
    let start = Instant::now();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("fail.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn create_serve_stop_serve_again_with_the_kek_from_the_kms() {
    let t = tempfile::tempdir().unwrap();
    let mut kms = KmsServer::start(t.path());
    let conf = kms_config(t.path(), &[kms.addr()], "client");
    let img = create(t.path(), &conf);
    let d = descriptor(&img);
    assert_eq!(d.provider, "kmip");
    assert!(d.key_name.starts_with("vmcrypt:") && d.key_name.contains(&d.luks_uuid));
    let (created_conns, created_ops) = ops(&kms);

    let started = Instant::now();
    let daemon = serve_kms(t.path(), "a", &img, &conf);
    eprintln!(
        "serve start to ready socket with KMIP: {:?}",
        started.elapsed()
    );
    let (conns, all_ops) = ops(&kms);
    let serve_ops = &all_ops[created_ops.len()..];
    let serve_conns = conns - created_conns;
    eprintln!(
        "KMS round trips for one start: {serve_conns} TLS connection(s), operations {serve_ops:?}"
    );
    assert_eq!(serve_conns, 1);
    assert!(serve_ops.len() <= 3, "{serve_ops:?}");
    assert!(serve_ops.iter().any(|o| o == "Get"), "{serve_ops:?}");

    let mut f = Frontend::connect(&daemon.socket, 1, MIB as usize);
    f.buf(0, 65536).copy_from_slice(&pattern(1, 65536));
    assert_eq!(f.write(0, MIB, 0, 65536), 0);
    // A KMS outage does not touch a running disk.
    kms.stop();
    assert_eq!(f.read(0, MIB, 65536, 65536), 0);
    assert_eq!(f.buf(65536, 65536), &pattern(1, 65536)[..]);
    drop(f);
    assert!(daemon.terminate().success());

    // With the KMS down, a start fails clearly within the deadline...
    let (err, took) = serve_fails(
        t.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--kms",
            conf.to_str().unwrap(),
            "--kms-deadline",
            "2",
        ],
    );
    assert!(
        err.contains("no KMS server reachable") && err.contains(&kms.addr()),
        "{err}"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    // ...and works again once it is back.
    let kms = KmsServer::start_on(t.path(), kms.port);
    let daemon = serve_kms(t.path(), "b", &img, &conf);
    let mut f = Frontend::connect(&daemon.socket, 1, MIB as usize);
    assert_eq!(f.read(0, MIB, 0, 65536), 0);
    assert_eq!(f.buf(0, 65536), &pattern(1, 65536)[..]);
    let (_, ops_after) = ops(&kms);
    assert!(
        ops_after.iter().any(|o| o == "Get"),
        "the KEK came from the KMS again: {ops_after:?}"
    );
}

#[test]
fn a_replica_serves_when_the_first_server_is_down() {
    let t = tempfile::tempdir().unwrap();
    let mut a = KmsServer::start(t.path());
    let b = KmsServer::start(t.path());
    // Give B different ids than A.
    provider(&kms_config(t.path(), &[b.addr()], "client"))
        .create_kek("unrelated")
        .unwrap();
    let conf_a = kms_config(t.path(), &[a.addr()], "client");
    let img = create(t.path(), &conf_a);
    let d = descriptor(&img);
    let kek = provider(&conf_a)
        .get_kek(&d.key_id, Some(&d.key_name))
        .unwrap();
    provider(&conf_a)
        .register_kek(&b.addr(), &d.key_name, &kek)
        .unwrap();
    a.stop();
    let cluster = kms_config(t.path(), &[a.addr(), b.addr()], "client");
    let daemon = serve_kms(t.path(), "a", &img, &cluster);
    let mut f = Frontend::connect(&daemon.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 16 * MIB);
    f.buf(0, 4096).fill(7);
    assert_eq!(f.write(0, 0, 0, 4096), 0);
}

#[test]
fn a_revoked_kek_is_refused_by_name_and_state() {
    let t = tempfile::tempdir().unwrap();
    let _kms = KmsServer::start(t.path());
    let conf = kms_config(t.path(), &[_kms.addr()], "client");
    let img = create(t.path(), &conf);
    let d = descriptor(&img);
    provider(&conf).revoke_kek(&d.key_id).unwrap();
    let before = std::fs::read(&img).unwrap();
    let (err, _) = serve_fails(
        t.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--kms",
            conf.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains(&format!("key {} is deactivated", d.key_id)),
        "{err}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn clients_the_kms_refuses_and_kms_check() {
    let t = tempfile::tempdir().unwrap();
    let kms = KmsServer::start(t.path());
    let good = kms_config(t.path(), &[kms.addr()], "client");
    let img = create(t.path(), &good);
    let other = kms_config(t.path(), &[kms.addr()], "other-client");
    let (err, took) = serve_fails(
        t.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--kms",
            other.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("TLS handshake failed") && err.contains(&kms.addr()),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    let out = vmcrypt(&["kms", "check", "--kms", good.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("client accepted") && text.contains(" 1.2"),
        "{} {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vmcrypt(&["kms", "check", "--kms", other.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("FAILED"), "{text}");
    let down = kms_config(t.path(), &["localhost:1".into()], "client");
    let out = vmcrypt(&["kms", "check", "--kms", down.to_str().unwrap()]);
    assert!(!out.status.success());
}

#[test]
fn rekey_while_served_then_the_old_kek_no_longer_opens_the_image() {
    let t = tempfile::tempdir().unwrap();
    let kms = KmsServer::start(t.path());
    let conf = kms_config(t.path(), &[kms.addr()], "client");
    let img = create(t.path(), &conf);
    let old = descriptor(&img);
    let old_kek = provider(&conf).get_kek(&old.key_id, None).unwrap();

    let daemon = serve_kms(t.path(), "a", &img, &conf);
    let mut f = Frontend::connect(&daemon.socket, 1, MIB as usize);
    f.buf(0, 65536).copy_from_slice(&pattern(9, 65536));
    assert_eq!(f.write(0, 0, 0, 65536), 0);
    let out = vmcrypt(&[
        "rekey",
        img.to_str().unwrap(),
        "--kms",
        conf.to_str().unwrap(),
        "--revoke-old",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The running disk is unaffected.
    f.buf(0, 4096).copy_from_slice(&pattern(10, 4096));
    assert_eq!(f.write(0, 8 * MIB, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 4096, 65536), 0);
    assert_eq!(f.buf(4096, 65536), &pattern(9, 65536)[..]);
    drop(f);
    assert!(daemon.terminate().success());

    let new = descriptor(&img);
    assert_ne!(new.key_id, old.key_id);
    assert_eq!(new.luks_uuid, old.luks_uuid);
    assert_eq!(
        provider(&conf).key_state(&old.key_id).unwrap(),
        KeyState::Deactivated
    );
    // The old KEK opens nothing any more.
    let old_pass = t.path().join("old-pass");
    std::fs::write(&old_pass, hex(old_kek.as_bytes())).unwrap();
    let (err, _) = serve_fails(
        t.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--passphrase-file",
            old_pass.to_str().unwrap(),
        ],
    );
    assert!(err.contains("no key slot opens"), "{err}");
    // The new one does, with the data intact.
    let daemon = serve_kms(t.path(), "b", &img, &conf);
    let mut f = Frontend::connect(&daemon.socket, 1, MIB as usize);
    assert_eq!(f.read(0, 0, 0, 65536), 0);
    assert_eq!(f.buf(0, 65536), &pattern(9, 65536)[..]);
    assert_eq!(f.read(0, 8 * MIB, 0, 4096), 0);
    assert_eq!(f.buf(0, 4096), &pattern(10, 4096)[..]);
    let file = std::fs::File::open(&img).unwrap();
    assert_eq!(
        Luks::open(&file, &img).unwrap().header.active_slots().len(),
        1
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn no_key_material_in_the_logs_at_trace_level() {
    let t = tempfile::tempdir().unwrap();
    let kms = KmsServer::start(t.path());
    let conf = kms_config(t.path(), &[kms.addr()], "client");
    let img = create(t.path(), &conf);
    let d = descriptor(&img);
    let kek: Kek = provider(&conf).get_kek(&d.key_id, None).unwrap();
    let file = std::fs::File::open(&img).unwrap();
    let (dek, _) = Luks::open(&file, &img)
        .unwrap()
        .unlock(&Passphrase::from_kek(kek.as_bytes()))
        .unwrap();

    let daemon = Daemon::start(
        t.path(),
        "trace",
        &[
            "--image",
            img.to_str().unwrap(),
            "--kms",
            conf.to_str().unwrap(),
            "--log-level",
            "trace",
        ],
    );
    let mut f = Frontend::connect(&daemon.socket, 1, MIB as usize);
    assert_eq!(f.read(0, 0, 0, 4096), 0);
    drop(f);
    let out = vmcrypt(&[
        "rekey",
        img.to_str().unwrap(),
        "--kms",
        conf.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let log = format!(
        "{}{}{}",
        daemon.log_text(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was not on"
    );
    let kek_bytes = kek.as_bytes().to_vec();
    let dek_bytes = dek.as_bytes().to_vec();
    for (what, secret) in [("KEK", &kek_bytes), ("DEK", &dek_bytes)] {
        for form in [
            hex(secret),
            hex(secret).to_uppercase(),
            base64(secret),
            base64(&secret[..32]),
        ] {
            assert!(
                !log.contains(&form),
                "the {what} appears in the log as {form}"
            );
        }
        assert!(
            !log.as_bytes()
                .windows(secret.len())
                .any(|w| w == secret.as_slice()),
            "raw {what} in the log"
        );
    }
}
