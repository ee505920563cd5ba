//! The KMIP provider against real PyKMIP servers over mutual TLS.

mod support;

use std::time::{Duration, Instant};

use support::*;
use vmcrypt_kms::{KeyProvider, KeyState, KmipProvider, KmsError};

fn provider(
    dir: &std::path::Path,
    servers: &[String],
    client: &str,
    deadline: Duration,
) -> KmipProvider {
    KmipProvider::from_file(&kms_config(dir, servers, client), deadline).unwrap()
}

#[test]
fn create_get_revoke_destroy() {
    let t = tempfile::tempdir().unwrap();
    let s = KmsServer::start(t.path());
    let p = provider(t.path(), &[s.addr()], "client", Duration::from_secs(5));
    let (id, kek) = p.create_kek("vmcrypt:test-1").unwrap();
    assert_eq!(
        p.get_kek(&id, Some("vmcrypt:test-1")).unwrap().as_bytes(),
        kek.as_bytes()
    );
    assert_eq!(p.key_state(&id).unwrap(), KeyState::Active);
    let checks = p.check();
    assert!(
        checks[0].result.as_ref().unwrap().contains("KMIP"),
        "{checks:?}"
    );
    p.revoke_kek(&id).unwrap();
    match p.get_kek(&id, None) {
        Err(KmsError::NotActive { id: i, state }) => {
            assert_eq!(i, id);
            assert_eq!(state, KeyState::Deactivated);
        }
        other => panic!("{other:?}"),
    }
    p.destroy_kek(&id).unwrap();
    assert!(p.get_kek(&id, None).is_err());
    assert!(matches!(
        p.get_kek("no-such-key", None),
        Err(KmsError::NotFound { .. })
    ));
}

#[test]
fn second_server_serves_a_replicated_key() {
    let t = tempfile::tempdir().unwrap();
    let mut a = KmsServer::start(t.path());
    let b = KmsServer::start(t.path());
    let pa = provider(t.path(), &[a.addr()], "client", Duration::from_secs(5));
    // Make B's ids differ from A's.
    let pb = provider(t.path(), &[b.addr()], "client", Duration::from_secs(5));
    pb.create_kek("unrelated").unwrap();
    let (id, kek) = pa.create_kek("vmcrypt:replicated").unwrap();
    pa.register_kek(&b.addr(), "vmcrypt:replicated", &kek)
        .unwrap();
    a.stop();
    let cluster = provider(
        t.path(),
        &[a.addr(), b.addr()],
        "client",
        Duration::from_secs(10),
    );
    let got = cluster.get_kek(&id, Some("vmcrypt:replicated")).unwrap();
    assert_eq!(got.as_bytes(), kek.as_bytes());
}

#[test]
fn a_client_from_another_ca_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = KmsServer::start(t.path());
    let p = provider(
        t.path(),
        &[s.addr()],
        "other-client",
        Duration::from_secs(30),
    );
    let start = Instant::now();
    let err = p.create_kek("x").unwrap_err().to_string();
    // A definite refusal: no retrying until the deadline.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        err.contains(&s.addr())
            && err.contains("TLS handshake failed")
            && err.contains("UnknownCA"),
        "{err}"
    );
    let check = p.check();
    assert!(check[0].result.is_err(), "{check:?}");
}

#[test]
fn a_down_kms_gives_a_clear_error_within_the_deadline() {
    let t = tempfile::tempdir().unwrap();
    let servers = vec!["localhost:1".to_string(), "localhost:2".to_string()];
    let p = provider(t.path(), &servers, "client", Duration::from_secs(2));
    let start = Instant::now();
    let err = p.get_kek("1", None).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("localhost:1") && msg.contains("localhost:2"),
        "{msg}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[test]
fn servers_by_ip_address_are_verified_against_ip_sans() {
    let t = tempfile::tempdir().unwrap();
    let s = KmsServer::start(t.path());
    // The server certificate carries IP:127.0.0.1: an address works as is.
    let conf = kms_config(t.path(), &[format!("127.0.0.1:{}", s.port)], "client");
    let p = KmipProvider::from_file(&conf, Duration::from_secs(5)).unwrap();
    let (id, kek) = p.create_kek("vmcrypt:by-ip").unwrap();
    assert_eq!(p.get_kek(&id, None).unwrap().as_bytes(), kek.as_bytes());
    // A name the certificate does not carry is refused at once, not retried.
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("server_name = \"kms.elsewhere.example\"\n");
    std::fs::write(&conf, text).unwrap();
    let p = KmipProvider::from_file(&conf, Duration::from_secs(30)).unwrap();
    let start = Instant::now();
    let err = p.get_kek(&id, None).unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        err.contains("TLS handshake failed") && err.contains("not valid for name"),
        "{err}"
    );
}
