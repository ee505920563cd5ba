//! `serve --control`: the JSON-RPC control socket, driven beside a libblkio
//! frontend doing I/O.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blkio::ReqFlags;
use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn serve(dir: &Path, extra: &[&str]) -> (Daemon, PathBuf) {
    let img = sparse_image(dir, 16 * MIB);
    let control = dir.join("control.sock");
    let mut args = vec![
        "--image",
        img.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start(dir, "vmcrypt", &args);
    d.wait_for_log("control socket listening");
    (d, control)
}

#[test]
fn query_stats_counts_what_the_client_did() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &["--num-queues", "2"]);
    let mut rpc = Rpc::connect(&control);
    let before = rpc.result("query-stats", json!({}));
    assert_eq!(before["total"]["read_ops"], 0);

    let mut f = Frontend::connect(&d.socket, 2, 2 * MIB as usize);
    for i in 0..5u64 {
        assert_eq!(f.write(0, i * 8192, 0, 8192), 0);
    }
    for i in 0..3u64 {
        assert_eq!(f.read(1, i * 4096, 0, 4096), 0);
    }
    assert_eq!(f.flush(1), 0);
    f.queues[0].discard(0, 65536, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    // Past the end of the disk: an error.
    assert_ne!(f.read(1, 16 * MIB, 0, 4096), 0);

    let s = rpc.result("query-stats", json!(null));
    let (q0, q1, t) = (&s["queues"][0], &s["queues"][1], &s["total"]);
    assert_eq!(
        (q0["queue"].as_u64(), q1["queue"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(q0["write_ops"], 5);
    assert_eq!(q0["write_bytes"], 5 * 8192);
    assert_eq!(q0["discard_ops"], 1);
    assert_eq!(q0["read_ops"], 0);
    assert_eq!(q1["read_ops"], 3 + 1);
    assert_eq!(q1["read_bytes"], 3 * 4096);
    assert_eq!(q1["flush_ops"], 1);
    assert_eq!(q1["errors"], 1);
    assert_eq!(t["write_ops"], 5);
    assert_eq!(t["read_ops"], 4);
    assert_eq!(t["errors"], 1);
    assert_eq!(t["in_flight"], 0);
    // Writes to a file in the page cache do not block.
    assert_eq!(t["blocked_writes"], 0);
    let p50 = t["latency_us"]["write"]["p50"].as_f64().unwrap();
    let p999 = t["latency_us"]["write"]["p999"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p999, "{t}");

    // The same figures as Prometheus text, checked by Prometheus' parser.
    let text = rpc.result("metrics", json!({}));
    let text = text.as_str().unwrap();
    let samples = parse_prometheus(text);
    let sample = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
            .2
    };
    assert_eq!(
        sample("vmcrypt_requests_total", &[("queue", "0"), ("op", "write")]),
        5.0
    );
    assert_eq!(
        sample("vmcrypt_bytes_total", &[("queue", "1"), ("op", "read")]),
        12288.0
    );
    assert_eq!(
        sample("vmcrypt_blocked_writes_total", &[("queue", "0")]),
        0.0
    );
    assert_eq!(
        sample("vmcrypt_errors_total", &[("queue", "1"), ("op", "read")]),
        1.0
    );
    assert_eq!(
        sample(
            "vmcrypt_request_duration_seconds_count",
            &[("queue", "0"), ("op", "write")]
        ),
        5.0
    );
    assert_eq!(
        sample(
            "vmcrypt_request_duration_seconds_bucket",
            &[("queue", "0"), ("op", "write"), ("le", "+Inf")]
        ),
        5.0
    );
    assert_eq!(sample("vmcrypt_capacity_bytes", &[]), (16 * MIB) as f64);
    assert_eq!(sample("vmcrypt_frontend_connected", &[]), 1.0);
    drop(f);
}

/// Samples (name, labels, value) as Prometheus' Python client parses them.
fn parse_prometheus(text: &str) -> Vec<(String, std::collections::HashMap<String, String>, f64)> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kms/venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `bash ci/kms.sh setup target/kms` (ci/test.sh does)",
        python.display()
    );
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused:\n{text}"
    );
    let v: Vec<(String, std::collections::HashMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v.is_empty());
    v
}

#[test]
fn status_tells_what_is_served_and_never_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &["--read-only", "--filter", "stats"]);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let mut rpc = Rpc::connect(&control);
    let s = rpc.result("status", json!({}));
    assert_eq!(s["format"], "raw");
    assert_eq!(s["capacity"], 16 * MIB);
    assert_eq!(s["block_size"], 512);
    assert_eq!(s["read_only"], true);
    assert_eq!(s["frontend_connected"], false);
    // The throttle set-throttle needs, with no limit, first.
    assert_eq!(s["filters"], json!(["throttle", "stats"]));
    assert_eq!(s["throttle"], json!({}));
    assert_eq!(s["key_id"], Value::Null);
    assert!(s["image"].as_str().unwrap().ends_with("disk.img"));
    assert!(s["uptime_s"].as_f64().unwrap() >= 0.0);
    let _f = Frontend::connect_with(&d.socket, 1, MIB as usize, true);
    assert_eq!(rpc.result("status", json!({}))["frontend_connected"], true);

    // The ctl client prints it readably, and the raw result with --json.
    let out = Command::new(bin())
        .args(["ctl", "--control", control.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("format: raw"), "{text}");
    let out = Command::new(bin())
        .args([
            "ctl",
            "--json",
            "--control",
            control.to_str().unwrap(),
            "query-stats",
        ])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["total"]["read_ops"].as_u64().is_some());
}

/// `notify-guest` interrupts the guest on every running queue (what the
/// daemon does when a ring starts), and the disk serves on.
#[test]
fn notify_guest_signals_every_running_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &["--num-queues", "2"]);
    let mut rpc = Rpc::connect(&control);
    assert_eq!(rpc.result("notify-guest", json!({}))["queues"], 0);
    let mut f = Frontend::connect(&d.socket, 2, MIB as usize);
    for q in 0..2 {
        assert_eq!(f.read(q, 0, 0, 4096), 0);
    }
    assert_eq!(rpc.result("notify-guest", json!({}))["queues"], 2);
    assert_eq!(f.write(1, 4096, 0, 4096), 0);
    assert_eq!(f.read(0, 4096, 8192, 4096), 0);
    d.wait_for_log("control: guest notified");
}

#[test]
fn bad_requests_get_errors_and_the_disk_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    let mut rpc = Rpc::connect(&control);
    let code = |a: &Value| {
        a["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("no error: {a}"))
    };
    let message = |a: &Value| a["error"]["message"].as_str().unwrap().to_string();

    let a = rpc.call("no-such-method", json!({}));
    assert_eq!(code(&a), -32601);
    assert!(message(&a).contains("no-such-method"));
    let a = rpc.call("set-throttle", json!({"total_iops_sec": "fast"}));
    assert_eq!(code(&a), -32602);
    assert!(message(&a).contains("total_iops_sec"), "{a}");
    let a = rpc.call("set-throttle", json!({"iops": 5}));
    assert_eq!(code(&a), -32602);
    assert!(message(&a).contains("unknown limit 'iops'"), "{a}");
    let a = rpc.call("set-throttle", json!([1, 2]));
    assert_eq!(code(&a), -32602);
    let a = rpc.call("status", json!({"verbose": true}));
    assert_eq!(code(&a), -32602);
    assert_eq!(code(&rpc.raw(b"{this is not json")), -32700);
    assert_eq!(code(&rpc.raw(br#"{"id":1,"method":"status"}"#)), -32600);
    // An oversized line: an error for it, and the connection goes on.
    let mut big = br#"{"jsonrpc":"2.0","id":9,"method":"status","params":{"x":""#.to_vec();
    big.resize(200_000, b'a');
    big.extend_from_slice(br#""}}"#);
    let a = rpc.raw(&big);
    assert_eq!(code(&a), -32600);
    assert!(message(&a).contains("longer than"), "{a}");
    assert_eq!(rpc.result("status", json!({}))["format"], "raw");
    // A client that hangs up mid-line harms nothing.
    {
        let mut s = UnixStream::connect(&control).unwrap();
        s.write_all(br#"{"jsonrpc":"2.0","id":1,"me"#).unwrap();
    }
    // Several clients at once.
    let mut others: Vec<Rpc> = (0..4).map(|_| Rpc::connect(&control)).collect();
    for (i, o) in others.iter_mut().enumerate() {
        assert_eq!(
            o.result("query-stats", json!({}))["queues"][0]["queue"],
            0,
            "client {i}"
        );
    }
    // The disk still serves.
    f.buf(0, 4096).copy_from_slice(&pattern(5, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 8192, 4096), 0);
    assert_eq!(f.buf(8192, 4096), &pattern(5, 4096)[..]);
    assert!(d.child_alive());
}

/// set-throttle on a daemon started without a throttle: the new limit holds
/// within 10% with I/O running, and 0 removes it.
#[test]
fn set_throttle_changes_the_limit_live() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    let mut rpc = Rpc::connect(&control);
    let free = read_iops(&mut f, Duration::from_millis(500));

    let limit = 300.0;
    let r = rpc.result("set-throttle", json!({"total_iops_sec": limit as u64}));
    assert_eq!(r["throttle"]["total_iops_sec"], limit as u64);
    read_iops(&mut f, Duration::from_millis(300)); // past the burst
    let iops = read_iops(&mut f, Duration::from_secs(3));
    assert!(
        (iops - limit).abs() <= limit * 0.1,
        "{iops:.0} IOPS with a limit of {limit} (unthrottled: {free:.0})"
    );
    // Through the ctl client, with a size suffix, then removed.
    let out = Command::new(bin())
        .args([
            "ctl",
            "--control",
            control.to_str().unwrap(),
            "set-throttle",
            "total_iops_sec=0",
            "read_bytes_sec=1M",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = rpc.result("status", json!({}));
    assert_eq!(s["throttle"], json!({"read_bytes_sec": 1 << 20}));
    rpc.result("set-throttle", json!({"read_bytes_sec": 0}));
    let after = read_iops(&mut f, Duration::from_millis(500));
    assert!(
        after > 3.0 * limit,
        "{after:.0} IOPS after the limit was removed"
    );
    assert!(d.log_text().contains("throttle limits changed"));
}

fn vmcrypt(args: &[&str]) -> std::process::Output {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "vmcrypt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn error_message(a: &Value) -> String {
    a["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {a}"))
        .to_string()
}

/// resize grows the disk under a connected frontend: its queues take
/// requests in the new space at once, without reconnecting. Shrinking and
/// sizes that are not whole blocks are refused.
#[test]
fn resize_grows_the_disk_live_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &["--num-queues", "2"]);
    let mut f = Frontend::connect(&d.socket, 2, MIB as usize);
    let mut rpc = Rpc::connect(&control);
    f.buf(0, 4096).copy_from_slice(&pattern(1, 4096));
    assert_ne!(f.write(0, 20 * MIB, 0, 4096), 0, "past the end before");

    let a = rpc.call("resize", json!({"size": 8 * MIB}));
    assert!(error_message(&a).contains("shrinking is refused"), "{a}");
    let a = rpc.call("resize", json!({"size": 16 * MIB + 100}));
    assert!(
        error_message(&a).contains("multiple of the block size"),
        "{a}"
    );
    let a = rpc.call("resize", json!({"size": true}));
    assert_eq!(a["error"]["code"], -32602);

    let r = rpc.result("resize", json!({"size": "32M"}));
    assert_eq!(r["capacity"], 32 * MIB);
    assert_eq!(r["previous"], 16 * MIB);
    // libblkio sets up no backend request channel: told on reconnect.
    assert_eq!(r["frontend_notified"], false);
    assert_eq!(
        std::fs::metadata(dir.path().join("disk.img"))
            .unwrap()
            .len(),
        32 * MIB
    );
    for q in 0..2 {
        assert_eq!(
            f.write(q, 20 * MIB + q as u64 * 4096, 0, 4096),
            0,
            "queue {q}"
        );
        assert_eq!(f.read(q, 20 * MIB + q as u64 * 4096, 8192, 4096), 0);
        assert_eq!(f.buf(8192, 4096), &pattern(1, 4096)[..]);
    }
    assert_ne!(f.write(0, 32 * MIB, 0, 4096), 0, "past the new end");
    assert_eq!(rpc.result("status", json!({}))["capacity"], 32 * MIB);
    // Sizes no storage takes are refused before anything changes.
    let a = rpc.call("resize", json!({"size": 1u64 << 63}));
    assert!(error_message(&a).contains("larger"), "{a}");
    let a = rpc.call("resize", json!({"size": 1u64 << 50}));
    assert!(error_message(&a).contains("growing the image"), "{a}");
    assert_eq!(rpc.result("status", json!({}))["capacity"], 32 * MIB);

    // Through the ctl client; a new connection sees the new capacity.
    vmcrypt(&[
        "ctl",
        "--control",
        control.to_str().unwrap(),
        "resize",
        "size=48M",
    ]);
    drop(f);
    let f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 48 * MIB);
    drop(f);
    // SIGTERM reaches the signal thread, not the control thread.
    let status = d.terminate();
    assert!(status.success(), "SIGTERM with a control socket: {status}");
}

/// A LUKS image grows by its payload; qemu-img then sees the new size.
#[test]
fn resize_grows_an_encrypted_payload() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let keys = dir.path().join("keys");
    vmcrypt(&[
        "create",
        img.to_str().unwrap(),
        "--size",
        "16M",
        "--keystore",
        keys.to_str().unwrap(),
    ]);
    let control = dir.path().join("control.sock");
    let d = Daemon::start(
        dir.path(),
        "vmcrypt",
        &[
            "--image",
            img.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    let mut rpc = Rpc::connect(&control);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    rpc.result("resize", json!({"size": 24 * MIB}));
    f.buf(0, 4096).copy_from_slice(&pattern(7, 4096));
    assert_eq!(f.write(0, 24 * MIB - 4096, 0, 4096), 0);
    assert_eq!(f.read(0, 24 * MIB - 4096, 4096, 4096), 0);
    assert_eq!(f.buf(4096, 4096), &pattern(7, 4096)[..]);
    drop(f);
    drop(d);
    // qemu-img, with the key slot's passphrase, agrees on the size.
    let pass = dir.path().join("pass");
    vmcrypt(&[
        "export-passphrase",
        img.to_str().unwrap(),
        "--output",
        pass.to_str().unwrap(),
        "--keystore",
        keys.to_str().unwrap(),
    ]);
    let out = Command::new("qemu-img")
        .args([
            "info",
            "--output=json",
            "--object",
            &format!("secret,id=k,file={}", pass.display()),
            "--image-opts",
            &format!("driver=luks,key-secret=k,file.filename={}", img.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 24 * MIB);
}

/// A snapshot taken while a frontend writes: it holds every write that
/// completed before the request and none submitted after the answer, it
/// serves on its own (its own key descriptor), and the live disk goes on.
#[test]
fn snapshot_on_xfs_holds_the_disk_at_that_instant() {
    let xfs = Xfs::mount(1 << 30);
    let img = xfs.mnt.join("disk.img");
    let keys = xfs.mnt.join("keys");
    vmcrypt(&[
        "create",
        img.to_str().unwrap(),
        "--size",
        "64M",
        "--keystore",
        keys.to_str().unwrap(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let d = Daemon::start(
        dir.path(),
        "live",
        &[
            "--image",
            img.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    const BLOCKS: u64 = 64;
    const BS: usize = 4096;

    // The writer: block b gets generation g's pattern, round and round.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = std::time::Instant::now();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut log = Vec::new(); // (block, gen, submitted, done)
            let mut gen = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for b in 0..BLOCKS {
                    gen += 1;
                    f.buf(0, BS).copy_from_slice(&pattern(gen, BS));
                    let submitted = start.elapsed();
                    assert_eq!(f.write(0, b * BS as u64, 0, BS), 0);
                    log.push((b, gen, submitted, start.elapsed()));
                }
            }
            (f, log)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let snap = xfs.mnt.join("snap.img");
    let mut rpc = Rpc::connect(&control);
    let before = start.elapsed();
    let r = rpc.result("snapshot", json!({"path": snap.to_str().unwrap()}));
    let after = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut f, log) = writer.join().unwrap();
    let pause_ms = r["pause_ms"].as_f64().unwrap();
    eprintln!("snapshot pause: {pause_ms:.2} ms; {} writes", log.len());
    assert_eq!(r["path"], snap.to_str().unwrap());
    let desc = format!("{}.vmcrypt", snap.display());
    assert_eq!(r["key_descriptor"], desc.as_str());
    assert!(log.iter().any(|w| w.3 < before) && log.iter().any(|w| w.2 > after));

    // The live disk holds each block's last write.
    for b in 0..BLOCKS {
        let last = log.iter().rfind(|w| w.0 == b).unwrap().1;
        assert_eq!(f.read(0, b * BS as u64, 0, BS), 0);
        assert_eq!(f.buf(0, BS), &pattern(last, BS)[..], "live block {b}");
    }
    drop(f);

    // The snapshot serves on its own (no --keystore: its descriptor says).
    let s = Daemon::start(dir.path(), "snap", &["--image", snap.to_str().unwrap()]);
    let mut g = Frontend::connect(&s.socket, 1, MIB as usize);
    for b in 0..BLOCKS {
        assert_eq!(g.read(0, b * BS as u64, 0, BS), 0);
        let got = g.buf(0, BS).to_vec();
        let writes: Vec<_> = log.iter().filter(|w| w.0 == b).collect();
        let found = writes
            .iter()
            .find(|w| pattern(w.1, BS) == got)
            .unwrap_or_else(|| panic!("snapshot block {b} holds none of its writes"));
        // Not older than the last write done before the request...
        if let Some(done) = writes.iter().rfind(|w| w.3 < before) {
            assert!(
                found.1 >= done.1,
                "block {b}: gen {} older than {}",
                found.1,
                done.1
            );
        }
        // ...and nothing submitted after the answer.
        assert!(
            found.2 < after,
            "block {b}: gen {} submitted after the snapshot",
            found.1
        );
    }
    drop(g);
    drop(s);

    // A second snapshot onto the same name is refused, and the name kept.
    let a = rpc.call("snapshot", json!({"path": snap.to_str().unwrap()}));
    assert!(error_message(&a).contains("already exists"), "{a}");
    assert!(snap.exists());
    let a = rpc.call("snapshot", json!({"path": "relative.img"}));
    assert!(error_message(&a).contains("absolute"), "{a}");
    // Through the ctl client.
    let snap2 = xfs.mnt.join("snap2.img");
    let out = vmcrypt(&[
        "ctl",
        "--control",
        control.to_str().unwrap(),
        "snapshot",
        &format!("path={}", snap2.display()),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("pause_ms"), "{text}");
    assert!(snap2.exists());
    assert!(d.child_alive());
}

/// On a file system without reflinks (ext4 here) a snapshot is refused at
/// once, leaves no file behind, and the disk keeps serving.
#[test]
fn snapshot_without_reflinks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    let mut rpc = Rpc::connect(&control);
    let snap = dir.path().join("snap.img");
    let a = rpc.call("snapshot", json!({"path": snap.to_str().unwrap()}));
    assert!(error_message(&a).contains("no reflinks"), "{a}");
    assert!(!snap.exists(), "a failed snapshot left its file");
    f.buf(0, 4096).copy_from_slice(&pattern(3, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 4096, 4096), 0);
    assert_eq!(f.buf(4096, 4096), &pattern(3, 4096)[..]);
}

/// Where `--metrics-listen 127.0.0.1:0` listens, from the daemon's log.
fn metrics_address(d: &Daemon) -> String {
    d.wait_for_log("metrics served over HTTP");
    let log = d.log_text();
    log.split("address=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in the log:\n{log}"))
        .to_string()
}

/// GET over plain HTTP (one request per connection): (status line, body).
fn http(addr: &str, request: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// `--metrics-listen`: Prometheus scrapes /metrics over HTTP (checked by
/// its own parser), beside `vmcrypt top` showing the I/O live.
#[test]
fn metrics_over_http_and_top_show_live_io() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_address(&d);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    for i in 0..7u64 {
        assert_eq!(f.write(0, i * 4096, 0, 4096), 0);
    }

    let (status, body) = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let samples = parse_prometheus(&body);
    let writes = samples
        .iter()
        .find(|(n, l, _)| {
            n == "vmcrypt_requests_total" && l.get("op").map(String::as_str) == Some("write")
        })
        .unwrap_or_else(|| panic!("no write counter in:\n{body}"));
    assert_eq!(writes.2, 7.0);
    assert!(http(&addr, "GET /nothing HTTP/1.1\r\n\r\n")
        .0
        .contains("404"));
    assert!(http(&addr, "POST /metrics HTTP/1.1\r\n\r\n")
        .0
        .contains("405"));
    // A client that sends nothing and hangs up harms nothing.
    drop(std::net::TcpStream::connect(&addr).unwrap());

    // top, twice half a second apart, while reads run.
    let top = Command::new(bin())
        .args(["top", "--control", control.to_str().unwrap()])
        .args(["--interval", "0.5", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    read_iops(&mut f, Duration::from_millis(1500));
    let out = top.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("read IOPS"), "{text}");
    let total: Vec<&str> = text
        .lines()
        .rfind(|l| l.trim_start().starts_with("total"))
        .unwrap_or_else(|| panic!("no total row:\n{text}"))
        .split_whitespace()
        .collect();
    let iops: f64 = total[1].parse().unwrap();
    assert!(iops > 100.0, "top showed {iops} read IOPS:\n{text}");
    assert_ne!(total[6], "-", "no read latency:\n{text}");
    assert!(d.child_alive());
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `vmcrypt ctl ... status` run as `uid` (and its group): (success, output).
fn ctl_as(uid: u32, control: &Path) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(bin())
        .args(["ctl", "--control", control.to_str().unwrap(), "status"])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The control socket is the admin API: it never takes the vhost-user
/// socket's mode and group (QEMU's, which a guest may subvert), and a
/// client whose uid is not allowed is refused even where the socket's mode
/// lets it connect.
#[test]
fn the_control_socket_is_for_the_allowed_users_only() {
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (d, control) = serve(
        dir.path(),
        &["--socket-mode", "0660", "--socket-group", "daemon"],
    );
    assert_eq!(mode_of(&d.socket), 0o660);
    assert_eq!(
        mode_of(&control),
        0o600,
        "the control socket took the data socket's mode"
    );
    let (ok, text) = ctl_as(NOBODY, &control);
    assert!(
        !ok && text.contains("Permission denied"),
        "nobody reached a 0600 control socket: {text}"
    );
    drop(d);

    // Open to everyone by mode: the uid check still refuses.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (d, control) = serve(dir.path(), &["--control-mode", "0666"]);
    assert_eq!(mode_of(&control), 0o666);
    let (ok, text) = ctl_as(NOBODY, &control);
    assert!(!ok && text.contains("not allowed"), "{text}");
    let (ok, text) = ctl_as(0, &control);
    assert!(ok && text.contains("device_running"), "{text}");
    drop(d);

    // An allowed user gets in.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_d, control) = serve(
        dir.path(),
        &["--control-mode", "0666", "--control-allow-uid", "nobody"],
    );
    let (ok, text) = ctl_as(NOBODY, &control);
    assert!(ok && text.contains("device_running"), "{text}");
}

/// A snapshot is made in the snapshot folder only (--snapshot-dir, else
/// the image's): a name with a '/', a path elsewhere or a planted symlink
/// is refused before any file exists, and nothing outside is touched.
#[test]
fn snapshots_are_made_in_their_folder_only() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let (_d, control) = serve(dir.path(), &[]);
    let mut rpc = Rpc::connect(&control);
    let outside = elsewhere.path().join("authorized_keys2");
    let a = rpc.call("snapshot", json!({"path": outside.to_str().unwrap()}));
    assert!(error_message(&a).contains("only"), "{a}");
    assert!(!outside.exists());
    for name in ["../x.img", "a/b", "..", ".", "", ".hidden", "x.img.vmcrypt"] {
        let a = rpc.call("snapshot", json!({ "name": name }));
        assert!(error_message(&a).contains("snapshot name"), "{name}: {a}");
    }
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // A symlink planted under the new name: never followed.
    let victim = elsewhere.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("planted.img")).unwrap();
    let a = rpc.call("snapshot", json!({"name": "planted.img"}));
    assert!(error_message(&a).contains("already exists"), "{a}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // A good name reaches the reflink, which ext4 refuses: no file left.
    let a = rpc.call("snapshot", json!({"name": "monday.img"}));
    assert!(error_message(&a).contains("no reflinks"), "{a}");
    assert!(!dir.path().join("monday.img").exists());
    let mut after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    after.retain(|n| n != "planted.img");
    assert_eq!(before.len(), after.len(), "{before:?} -> {after:?}");
    drop(_d);

    // --snapshot-dir moves them; a path in it is as good as its name.
    let dir = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let (_d, control) = serve(
        dir.path(),
        &["--snapshot-dir", snaps.path().to_str().unwrap()],
    );
    let mut rpc = Rpc::connect(&control);
    let a = rpc.call("snapshot", json!({"name": "tuesday.img"}));
    let m = error_message(&a);
    assert!(
        m.contains("no reflinks") && m.contains(snaps.path().to_str().unwrap()),
        "{a}"
    );
    let a = rpc.call(
        "snapshot",
        json!({"path": snaps.path().join("w.img").to_str().unwrap()}),
    );
    assert!(error_message(&a).contains("no reflinks"), "{a}");
    let a = rpc.call(
        "snapshot",
        json!({"path": dir.path().join("w.img").to_str().unwrap()}),
    );
    assert!(error_message(&a).contains("only"), "{a}");
}

/// At SIGTERM both socket files go, with the seccomp filter on (which
/// lets a confined thread remove names only in the sockets' folders).
#[test]
fn sigterm_removes_both_socket_files() {
    let dir = tempfile::tempdir().unwrap();
    let (d, control) = serve(dir.path(), &[]);
    d.wait_for_log("seccomp filter installed");
    let socket = d.socket.clone();
    assert!(d.terminate().success());
    assert!(!socket.exists(), "the vhost-user socket stayed");
    assert!(!control.exists(), "the control socket stayed");
}

/// All 32 client slots held by idle clients: a 33rd still gets its answer,
/// in the slot of the one idle the longest.
#[test]
fn idle_clients_never_lock_the_operator_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, control) = serve(dir.path(), &[]);
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&control).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = std::time::Instant::now();
    let mut rpc = Rpc::connect(&control);
    let s = rpc.result("status", json!({}));
    assert!(s["device_running"].is_boolean(), "{s}");
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(idle);
}

/// A client that trickles its request a byte a second holds the metrics
/// listener for the request deadline at most, not for as long as it
/// keeps trickling: a scrape behind it is answered within 10 s.
#[test]
fn a_trickling_client_does_not_hold_the_scrape_back() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _control) = serve(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_address(&d);
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            for b in b"GET /metrics HTTP/1.1\r\nHost: slow".iter() {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = std::time::Instant::now();
    let (status, _) = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(slow);
}
