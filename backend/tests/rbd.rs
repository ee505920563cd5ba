//! `--image rbd:POOL/IMAGE`: the libblkio suite against an RBD image on a
//! real single-node Ceph cluster (one monitor, one memstore OSD, started by
//! `ci/ceph.sh` for this test process), and what is refused at start.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use blkio::ReqFlags;
use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// A cluster under a temporary folder; `ci/ceph.sh stop` at drop or exit.
struct Ceph {
    dir: PathBuf,
    conf: PathBuf,
}

fn ceph_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/ceph.sh")
}

impl Ceph {
    fn start(cephx: bool) -> Ceph {
        assert!(
            Command::new("ceph-mon").arg("--version").output().is_ok(),
            "ceph-mon missing: install Ceph with ci/install-deps.sh"
        );
        let dir = tempfile::Builder::new()
            .prefix("vmcrypt-ceph")
            .tempdir()
            .unwrap()
            .keep();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = Command::new("bash");
        c.arg(ceph_script()).arg("start").arg(&dir);
        if cephx {
            c.arg("--cephx");
        }
        let out = c.env("CEPH_PORT", port.to_string()).output().unwrap();
        assert!(
            out.status.success(),
            "ci/ceph.sh start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ceph {
            conf: dir.join("ceph.conf"),
            dir,
        }
    }

    fn stop(dir: &Path) {
        let _ = Command::new("bash")
            .arg(ceph_script())
            .arg("stop")
            .arg(dir)
            .output();
        let _ = std::fs::remove_dir_all(dir);
    }

    fn rbd(&self, args: &[&str]) -> std::process::Output {
        Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap()
    }

    /// A new image `rbd/NAME` of `size` bytes.
    fn create(&self, name: &str, size: u64) -> String {
        let out = self.rbd(&[
            "create",
            &format!("rbd/{name}"),
            "--size",
            &format!("{}K", size / 1024),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("rbd:rbd/{name}")
    }

    /// The image's bytes, as `rbd export` reads them.
    fn export(&self, name: &str) -> Vec<u8> {
        let out = self.rbd(&["export", &format!("rbd/{name}"), "-"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `vmcrypt create rbd:rbd/NAME --size SIZE`, its KEK in the local key
    /// store `dir/keys`; what it printed.
    fn create_encrypted(&self, dir: &Path, name: &str, size: &str) -> String {
        ok(Command::new(bin())
            .args([
                "create",
                &format!("rbd:rbd/{name}"),
                "--size",
                size,
                "--keystore",
            ])
            .arg(dir.join("keys"))
            .arg("--ceph-conf")
            .arg(&self.conf)
            .output()
            .unwrap())
    }

    /// The passphrase of the encrypted image rbd/NAME (`vmcrypt
    /// export-passphrase`), in `dir/NAME.pass`.
    fn export_passphrase(&self, dir: &Path, name: &str) -> PathBuf {
        let pass = dir.join(format!("{name}.pass"));
        ok(Command::new(bin())
            .args(["export-passphrase", &format!("rbd:rbd/{name}"), "--output"])
            .arg(&pass)
            .arg("--ceph-conf")
            .arg(&self.conf)
            .output()
            .unwrap());
        pass
    }

    fn serve(&self, dir: &Path, name: &str, spec: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["--image", spec, "--ceph-conf", self.conf.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::start(dir, name, &args)
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        Ceph::stop(&self.dir);
    }
}

/// The cluster the tests of this process share (stopped at exit).
fn cluster() -> &'static Ceph {
    static CEPH: OnceLock<Ceph> = OnceLock::new();
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn stop_at_exit() {
        if let Some(d) = DIR.get() {
            Ceph::stop(d);
        }
    }
    CEPH.get_or_init(|| {
        let c = Ceph::start(false);
        DIR.set(c.dir.clone()).unwrap();
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(stop_at_exit) };
        c
    })
}

#[test]
fn write_then_read_back_multi_segment_first_and_last_sector() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let spec = ceph.create("rw", size);
    let d = ceph.serve(dir.path(), "rw", &spec, &[]);
    let _show = ShowLog(d.log.clone());
    let mut f = Frontend::connect(&d.socket, 1, 4 * MIB as usize);
    assert_eq!(f.capacity, size);
    let data = pattern(7, 12288);
    f.buf(0, 12288).copy_from_slice(&data);
    let iov = |base: *mut u8, len| libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    };
    let w = [
        iov(f.ptr(0), 512),
        iov(f.ptr(512), 7680),
        iov(f.ptr(8192), 4096),
    ];
    f.queues[0].writev(MIB, w.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    let r = [
        iov(f.ptr(MIB as usize), 4096),
        iov(f.ptr(2 * MIB as usize), 8192),
    ];
    f.queues[0].readv(MIB, r.as_ptr(), 2, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.buf(MIB as usize, 4096), &data[..4096]);
    assert_eq!(f.buf(2 * MIB as usize, 8192), &data[4096..]);
    for (seed, off) in [(1, 0), (2, size - 512)] {
        f.buf(0, 512).copy_from_slice(&pattern(seed, 512));
        assert_eq!(f.write(0, off, 0, 512), 0);
        f.buf(4096, 512).fill(0);
        assert_eq!(f.read(0, off, 4096, 512), 0);
        assert_eq!(f.buf(4096, 512), &pattern(seed, 512)[..]);
    }
    assert_eq!(f.flush(0), 0);
    drop(f);
    // RBD itself holds the data at the same offsets.
    let image = ceph.export("rw");
    assert_eq!(&image[MIB as usize..MIB as usize + 12288], &data[..]);
    assert_eq!(&image[(size - 512) as usize..], &pattern(2, 512)[..]);
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("zeroes", 16 * MIB);
    let d = ceph.serve(dir.path(), "zeroes", &spec, &[]);
    let mut f = Frontend::connect(&d.socket, 1, 2 * MIB as usize);
    let orig = pattern(3, MIB as usize);
    f.buf(0, MIB as usize).copy_from_slice(&orig);
    for off in [0, 4 * MIB, 8 * MIB] {
        assert_eq!(f.write(0, off, 0, MIB as usize), 0);
    }
    f.queues[0].write_zeroes(4096, 65536, 0, ReqFlags::NO_UNMAP);
    assert_eq!(f.wait(0), 0);
    f.queues[0].write_zeroes(4 * MIB + 8192, 16384, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    f.queues[0].discard(8 * MIB, MIB, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.read(0, 0, MIB as usize, 128 << 10), 0);
    let back = f.buf(MIB as usize, 128 << 10).to_vec();
    assert_eq!(&back[..4096], &orig[..4096]);
    assert!(back[4096..4096 + 65536].iter().all(|&b| b == 0));
    assert_eq!(&back[69632..], &orig[69632..128 << 10]);
    assert_eq!(f.read(0, 4 * MIB + 8192, MIB as usize, 16384), 0);
    assert!(f.buf(MIB as usize, 16384).iter().all(|&b| b == 0));
    // A discarded RBD range reads back zeroes.
    assert_eq!(f.read(0, 8 * MIB, MIB as usize, MIB as usize), 0);
    assert!(f.buf(MIB as usize, MIB as usize).iter().all(|&b| b == 0));
}

#[test]
fn read_only_and_bad_requests() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let spec = ceph.create("ro", size);
    {
        let d = ceph.serve(dir.path(), "rw", &spec, &[]);
        let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
        f.buf(0, 8192).copy_from_slice(&pattern(5, 8192));
        assert_eq!(f.write(0, 0, 0, 8192), 0);
        // Out of range, straddling the end, not whole sectors.
        assert!(f.read(0, size, 0, 512) < 0);
        assert!(f.write(0, size - 512, 0, 1024) < 0);
        assert!(f.read(0, u64::MAX - 511, 0, 512) < 0);
        assert!(f.write(0, 0, 0, 100) < 0);
        f.queues[0].discard(size - 4096, 8192, 0, ReqFlags::empty());
        assert!(f.wait(0) < 0);
        assert_eq!(f.read(0, 0, 16384, 8192), 0);
        assert_eq!(f.buf(16384, 8192), &pattern(5, 8192)[..]);
        assert!(d.child_alive());
    }
    let d = ceph.serve(dir.path(), "ro", &spec, &["--read-only"]);
    let mut f = Frontend::connect_with(&d.socket, 1, MIB as usize, true);
    f.buf(0, 4096).fill(0xee);
    assert!(f.write(0, 0, 0, 4096) < 0);
    f.queues[0].discard(0, 4096, 0, ReqFlags::empty());
    assert!(f.wait(0) < 0);
    assert_eq!(f.read(0, 0, 0, 8192), 0);
    assert_eq!(f.buf(0, 8192), &pattern(5, 8192)[..]);
    drop(f);
    assert_eq!(&ceph.export("ro")[..8192], &pattern(5, 8192)[..]);
}

#[test]
fn two_queues_and_reconnects_keep_the_data() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("queues", 16 * MIB);
    let d = ceph.serve(dir.path(), "queues", &spec, &["--num-queues", "2"]);
    for round in 0..3u64 {
        let mut f = Frontend::connect(&d.socket, 2, MIB as usize);
        if round > 0 {
            for q in 0..2 {
                let off = (round - 1) * MIB + q as u64 * 8 * MIB;
                assert_eq!(f.read(q, off, 0, 65536), 0);
                assert_eq!(f.buf(0, 65536), &pattern(off, 65536)[..], "round {round}");
            }
        }
        // Both queues at once: one request in flight on each.
        for q in 0..2usize {
            let off = round * MIB + q as u64 * 8 * MIB;
            let at = q * 65536;
            f.buf(at, 65536).copy_from_slice(&pattern(off, 65536));
            let p = f.ptr(at);
            f.queues[q].write(off, p, 65536, 0, ReqFlags::empty());
        }
        assert_eq!(f.wait(0), 0);
        assert_eq!(f.wait(1), 0);
        drop(f);
    }
    let log = d.log_text();
    assert_eq!(log.matches("frontend connected").count(), 3, "{log}");
}

/// SIGTERM while a throttle holds writes inside vmcrypt: every write
/// completes, the daemon exits 0, and a restart reads each one back.
#[test]
fn sigterm_completes_writes_in_flight() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("sigterm", 16 * MIB);
    let d = ceph.serve(
        dir.path(),
        "first",
        &spec,
        &["--filter", "throttle:write_iops_sec=20"],
    );
    let _show = ShowLog(d.log.clone());
    let mut f = Frontend::connect(&d.socket, 1, 4 * MIB as usize);
    const N: usize = 32;
    for i in 0..N {
        let at = i * 65536;
        f.buf(at, 65536)
            .copy_from_slice(&pattern(100 + i as u64, 65536));
        let p = f.ptr(at);
        f.queues[0].write(i as u64 * 65536, p, 65536, 0, ReqFlags::empty());
    }
    // Submit them all (libblkio queues them until do_io), let the first
    // few through the throttle, then stop the daemon.
    let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
    let mut no_wait = Duration::ZERO;
    f.queues[0]
        .do_io(&mut none, 0, Some(&mut no_wait), None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGTERM);
    let mut ok = 0;
    for _ in 0..N {
        if f.wait(0) == 0 {
            ok += 1;
        }
    }
    assert_eq!(ok, N, "writes in flight at SIGTERM failed");
    let status = d.wait_exit();
    assert!(status.success(), "{status}");
    drop(f);
    let d = ceph.serve(dir.path(), "second", &spec, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    for i in 0..N {
        assert_eq!(f.read(0, i as u64 * 65536, 0, 65536), 0);
        assert_eq!(
            f.buf(0, 65536),
            &pattern(100 + i as u64, 65536)[..],
            "write {i}"
        );
    }
}

fn start_fails(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("fail.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "started: {args:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let last = err.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("vmcrypt: error: "), "{err}");
    last
}

#[test]
fn missing_pool_image_and_a_cluster_that_is_down_are_refused() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let conf = ceph.conf.to_str().unwrap();
    let before = ceph.rbd(&["ls", "rbd"]).stdout;
    let e = start_fails(
        dir.path(),
        &["--image", "rbd:nopool/x", "--ceph-conf", conf],
    );
    assert!(e.contains("pool 'nopool' does not exist"), "{e}");
    let e = start_fails(
        dir.path(),
        &["--image", "rbd:rbd/noimage", "--ceph-conf", conf],
    );
    assert!(e.contains("rbd:rbd/noimage does not exist"), "{e}");
    assert_eq!(
        ceph.rbd(&["ls", "rbd"]).stdout,
        before,
        "something was created"
    );
    // A conf whose monitor nobody listens on: refused after the deadline,
    // naming the monitor.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = dir.path().join("down.conf");
    std::fs::write(
        &down,
        format!(
            "[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n\
             auth cluster required = none\nauth service required = none\n"
        ),
    )
    .unwrap();
    let t = std::time::Instant::now();
    let e = start_fails(
        dir.path(),
        &[
            "--image",
            "rbd:rbd/x",
            "--ceph-conf",
            down.to_str().unwrap(),
            "--ceph-deadline",
            "2",
        ],
    );
    assert!(e.contains("cannot reach the cluster"), "{e}");
    assert!(
        e.contains(&port.to_string()),
        "the monitor is not named: {e}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let e = start_fails(dir.path(), &["--image", "rbd:just-a-pool"]);
    assert!(e.contains("rbd:POOL/IMAGE"), "{e}");
}

/// With cephx on: the admin user's keyring (named in the conf) opens the
/// image; an unknown user is refused, naming it.
#[test]
fn cephx_user_and_keyring() {
    let ceph = Ceph::start(true);
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("auth", 4 * MIB);
    let d = ceph.serve(dir.path(), "auth", &spec, &["--ceph-id", "admin"]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(11, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 4096, 4096), 0);
    assert_eq!(f.buf(4096, 4096), &pattern(11, 4096)[..]);
    drop(f);
    drop(d);
    let e = start_fails(
        dir.path(),
        &[
            "--image",
            &spec,
            "--ceph-conf",
            ceph.conf.to_str().unwrap(),
            "--ceph-id",
            "nobody",
            "--ceph-deadline",
            "3",
        ],
    );
    assert!(
        e.contains("client.nobody") || e.contains("cannot reach"),
        "{e}"
    );
}

/// Prints a daemon's log when the test fails.
struct ShowLog(PathBuf);
impl Drop for ShowLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("vmcrypt log:\n{log}");
        }
    }
}

/// The monitor restarts while a disk is served: librados reconnects (new
/// sockets, under the syscall filter) and the disk keeps serving.
#[test]
fn the_daemon_survives_a_monitor_restart() {
    let ceph = Ceph::start(false);
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("monrestart", 4 * MIB);
    let d = ceph.serve(dir.path(), "mon", &spec, &[]);
    let _show = ShowLog(d.log.clone());
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(21, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    let out = Command::new("bash")
        .arg(ceph_script())
        .arg("restart-mon")
        .arg(&ceph.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The client notices and hunts for the monitor again.
    std::thread::sleep(Duration::from_secs(5));
    assert!(d.child_alive(), "vmcrypt died:\n{}", d.log_text());
    assert_eq!(f.write(0, 4096, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 8192, 4096), 0);
    assert_eq!(f.buf(8192, 4096), &pattern(21, 4096)[..]);
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// qemu-io through QEMU's own luks driver over its rbd driver; fails the
/// test if qemu-io fails.
fn qemu_io_luks(ceph: &Ceph, image: &str, pass: &Path, cmd: &str) -> String {
    ok(qemu_io_luks_output(ceph, image, pass, cmd))
}

/// As [`qemu_io_luks`], for a run that may fail (a key that must not open).
fn qemu_io_luks_output(ceph: &Ceph, image: &str, pass: &Path, cmd: &str) -> std::process::Output {
    Command::new("qemu-io")
        .arg("--object")
        .arg(format!("secret,id=s0,file={}", pass.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.driver=rbd,file.pool=rbd,file.image={image},file.conf={}",
            ceph.conf.display()
        ))
        .args(["-c", cmd])
        .output()
        .unwrap()
}

/// `vmcrypt create rbd:...` puts a LUKS1 header inside the RBD image and
/// the key descriptor in its metadata; `serve` finds both; the cluster
/// holds no plaintext; QEMU's luks-over-rbd reads what vmcrypt wrote and
/// vmcrypt reads what QEMU wrote.
#[test]
fn encrypted_rbd_images_interoperate_with_qemu() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let conf = ceph.conf.to_str().unwrap();
    let out = ceph.create_encrypted(dir.path(), "enc", "16M");
    assert!(
        out.contains("key descriptor in the image's metadata"),
        "{out}"
    );
    let meta = ok(ceph.rbd(&["image-meta", "get", "rbd/enc", "vmcrypt.descriptor"]));
    assert!(meta.contains("luks-uuid"), "{meta}");

    // vmcrypt writes a marker the test can look for in the objects.
    let marker = b"vmcrypt plaintext marker 0123456789".repeat(16);
    {
        let d = ceph.serve(dir.path(), "enc", "rbd:rbd/enc", &[]);
        let _show = ShowLog(d.log.clone());
        assert!(d.log_text().contains("opened the image's key slot"));
        let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
        assert_eq!(f.capacity, 16 * MIB);
        f.buf(0, 65536).fill(0x5a);
        assert_eq!(f.write(0, 0, 0, 65536), 0);
        f.buf(0, 4096).fill(0);
        f.buf(0, marker.len()).copy_from_slice(&marker);
        assert_eq!(f.write(0, 8 * MIB, 0, 4096), 0);
        assert_eq!(f.read(0, 8 * MIB, 8192, 4096), 0);
        assert_eq!(f.buf(8192, marker.len()), &marker[..]);
        drop(f);
        let log = d.log.clone();
        let status = d.terminate();
        assert!(
            status.success(),
            "{status}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    // No object of the image holds the marker or the 0x5a blocks.
    let objects = ok(Command::new("rados")
        .args(["-c", conf, "-p", "rbd", "ls"])
        .output()
        .unwrap());
    let data: Vec<&str> = objects
        .lines()
        .filter(|o| o.starts_with("rbd_data."))
        .collect();
    assert!(!data.is_empty(), "no data objects:\n{objects}");
    for o in data {
        let path = dir.path().join("object");
        ok(Command::new("rados")
            .args(["-c", conf, "-p", "rbd", "get", o])
            .arg(&path)
            .output()
            .unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == &marker[..]),
            "plaintext in {o}"
        );
        assert!(
            !bytes.windows(512).any(|w| w.iter().all(|&b| b == 0x5a)),
            "plaintext 0x5a sector in {o}"
        );
    }

    // QEMU reads what vmcrypt wrote, with the passphrase vmcrypt exports...
    let pass = ceph.export_passphrase(dir.path(), "enc");
    let out = qemu_io_luks(ceph, "enc", &pass, "read -P 0x5a 0 64k");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // ...and vmcrypt reads what QEMU wrote.
    qemu_io_luks(ceph, "enc", &pass, "write -P 0x3c 1M 64k");
    let d = ceph.serve(dir.path(), "enc2", "rbd:rbd/enc", &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.read(0, MIB, 0, 65536), 0);
    assert!(f.buf(0, 65536).iter().all(|&b| b == 0x3c));
}

/// A LUKS image qemu-img made on RBD serves with --passphrase-file; an
/// RBD image with a LUKS header and no key is refused, and so is a key
/// for an image without a header.
#[test]
fn qemu_made_luks_on_rbd_and_what_is_refused() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let conf = ceph.conf.to_str().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, b"correct horse battery staple").unwrap();
    let mut made = String::new();
    let mut created = false;
    for _ in 0..5 {
        let st = Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object"])
            .arg(format!("secret,id=s0,file={}", pass.display()))
            .args(["-o", "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512,iter-time=200"])
            .arg(format!("rbd:rbd/qluks:conf={conf}"))
            .arg("16M")
            .output()
            .unwrap();
        made = String::from_utf8_lossy(&st.stderr).into_owned();
        if st.status.success() {
            created = true;
            break;
        }
        let _ = ceph.rbd(&["rm", "rbd/qluks"]);
    }
    assert!(created, "qemu-img create failed: {made}");
    qemu_io_luks(ceph, "qluks", &pass, "write -P 0x77 0 64k");
    {
        let d = ceph.serve(
            dir.path(),
            "qluks",
            "rbd:rbd/qluks",
            &["--passphrase-file", pass.to_str().unwrap()],
        );
        let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
        assert_eq!(f.read(0, 0, 0, 65536), 0);
        assert!(f.buf(0, 65536).iter().all(|&b| b == 0x77));
    }
    // A header and no key: refused, naming the way out.
    let e = start_fails(
        dir.path(),
        &["--image", "rbd:rbd/qluks", "--ceph-conf", conf],
    );
    assert!(e.contains("--format raw"), "{e}");
    // A key for an image without a header: refused.
    ceph.create("plain", 4 * MIB);
    let e = start_fails(
        dir.path(),
        &[
            "--image",
            "rbd:rbd/plain",
            "--ceph-conf",
            conf,
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    );
    assert!(e.contains("no LUKS header"), "{e}");
}

/// Two daemons on one RBD image (a migration's source and destination):
/// only the one whose device runs holds librbd's exclusive lock and
/// writes; the other's device is refused until the first stops.
#[test]
fn only_the_running_device_holds_the_rbd_image() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("handover", 4 * MIB);
    let d = ceph.serve(dir.path(), "first", &spec, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(31, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    assert_eq!(f.flush(0), 0);

    let d2 = ceph.serve(dir.path(), "second", &spec, &[]);
    let _show = ShowLog(d2.log.clone());
    let refused = try_start(&d2.socket);
    assert!(
        refused.is_err(),
        "second device started beside the first:\n{}\n{}",
        d.log_text(),
        d2.log_text()
    );
    assert!(
        d2.log_text()
            .contains("another vmcrypt runs a device on it"),
        "{}",
        d2.log_text()
    );
    // The first device is undisturbed.
    f.buf(0, 4096).copy_from_slice(&pattern(32, 4096));
    assert_eq!(f.write(0, 4096, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 8192, 4096), 0);
    assert_eq!(f.buf(8192, 4096), &pattern(31, 4096)[..]);

    // The first device stops: the second takes over and reads its data.
    drop(f);
    d.wait_for_log("lock released");
    drop(refused);
    let mut g = Frontend::connect(&d2.socket, 1, MIB as usize);
    assert_eq!(g.read(0, 0, 0, 8192), 0);
    assert_eq!(g.buf(0, 4096), &pattern(31, 4096)[..]);
    assert_eq!(g.buf(4096, 4096), &pattern(32, 4096)[..]);
    assert!(try_start(&d.socket).is_err(), "the first took it back");
}

/// `info` and `rekey` of an encrypted RBD image read and write its
/// descriptor in the metadata: after the rekey the new KEK opens it and
/// the old one no longer does.
#[test]
fn info_and_rekey_of_an_encrypted_rbd_image() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let conf = ceph.conf.to_str().unwrap();
    let vmcrypt = |args: &[&str]| {
        ok(Command::new(bin())
            .args(args)
            .args(["--keystore", keys.to_str().unwrap(), "--ceph-conf", conf])
            .output()
            .unwrap())
    };
    ceph.create_encrypted(dir.path(), "rk", "8M");
    let key_id = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("key id:"))
            .unwrap_or_else(|| panic!("no key id in:\n{text}"))
            .split_whitespace()
            .last()
            .unwrap()
            .to_string()
    };
    let before = ok(Command::new(bin())
        .args(["info", "rbd:rbd/rk", "--ceph-conf", conf])
        .output()
        .unwrap());
    assert!(before.contains("format:         LUKS1"), "{before}");
    assert!(before.contains("capacity:       8388608 bytes"), "{before}");
    let old_pass = ceph.export_passphrase(dir.path(), "rk");

    let out = vmcrypt(&["rekey", "rbd:rbd/rk"]);
    assert!(out.contains("rekeyed rbd:rbd/rk"), "{out}");
    let after = ok(Command::new(bin())
        .args(["info", "rbd:rbd/rk", "--ceph-conf", conf])
        .output()
        .unwrap());
    assert_ne!(key_id(&before), key_id(&after));
    assert!(after.contains("key slots:      [1] in use"), "{after}");
    // The new key serves it; the old passphrase no longer opens it.
    let d = ceph.serve(dir.path(), "rk", "rbd:rbd/rk", &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(41, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    drop(f);
    drop(d);
    let out = qemu_io_luks_output(ceph, "rk", &old_pass, "read 0 4k");
    assert!(!out.status.success(), "the old passphrase still opens it");
}

/// The control socket's `snapshot` on an encrypted RBD image: an RBD
/// snapshot taken while the queues are held, which serves on its own
/// (read-only) with what was written before it; the live image goes on.
#[test]
fn control_snapshot_of_an_rbd_image() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let conf = ceph.conf.to_str().unwrap();
    ceph.create_encrypted(dir.path(), "snapped", "8M");
    let control = dir.path().join("control.sock");
    let d = ceph.serve(
        dir.path(),
        "live",
        "rbd:rbd/snapped",
        &["--control", control.to_str().unwrap()],
    );
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 65536).copy_from_slice(&pattern(51, 65536));
    assert_eq!(f.write(0, 0, 0, 65536), 0);

    let mut rpc = Rpc::connect(&control);
    let mut rpc = |params| rpc.call("snapshot", params);
    let r = rpc(json!({"name": "first"}));
    assert_eq!(r["result"]["snapshot"], "rbd:rbd/snapped@first", "{r}");
    eprintln!("RBD snapshot pause: {} ms", r["result"]["pause_ms"]);
    let r = rpc(json!({"name": "first"}));
    assert!(
        r["error"]["message"].as_str().unwrap().contains("exists"),
        "{r}"
    );
    let r = rpc(json!({"path": "/tmp/x.img"}));
    assert!(
        r["error"]["message"].as_str().unwrap().contains("name"),
        "{r}"
    );
    let r = rpc(json!({"name": "a/b"}));
    assert!(r["error"].is_object(), "{r}");

    f.buf(0, 65536).copy_from_slice(&pattern(52, 65536));
    assert_eq!(f.write(0, 0, 0, 65536), 0);
    assert!(d.child_alive());

    // The snapshot serves on its own, read-only, with the data before it.
    let e = start_fails(
        dir.path(),
        &["--image", "rbd:rbd/snapped@first", "--ceph-conf", conf],
    );
    assert!(e.contains("--read-only"), "{e}");
    let s = ceph.serve(
        dir.path(),
        "snap",
        "rbd:rbd/snapped@first",
        &["--read-only"],
    );
    let mut g = Frontend::connect_with(&s.socket, 1, MIB as usize, true);
    assert_eq!(g.read(0, 0, 0, 65536), 0);
    assert_eq!(g.buf(0, 65536), &pattern(51, 65536)[..]);
    assert_eq!(f.read(0, 0, 0, 65536), 0);
    assert_eq!(f.buf(0, 65536), &pattern(52, 65536)[..]);
}

/// `resize` on the control socket grows an encrypted RBD image by its
/// payload (`rbd_resize`) while a frontend runs: the new space is written
/// and read on the running queue, a new connection sees the new capacity,
/// `rbd info` counts the LUKS header on top, and QEMU's luks-over-rbd
/// reads what vmcrypt wrote at the new end.
#[test]
fn control_resize_grows_an_rbd_image() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    ceph.create_encrypted(dir.path(), "grown", "8M");
    let control = dir.path().join("control.sock");
    let d = ceph.serve(
        dir.path(),
        "grown",
        "rbd:rbd/grown",
        &["--control", control.to_str().unwrap()],
    );
    let _show = ShowLog(d.log.clone());
    let mut rpc = Rpc::connect(&control);
    let mut rpc = |params| rpc.call("resize", params);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 8 * MIB);
    f.buf(0, 65536).copy_from_slice(&pattern(61, 65536));
    assert_ne!(f.write(0, 12 * MIB, 0, 65536), 0, "past the end before");

    let r = rpc(json!({"size": "4M"}));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shrinking is refused"),
        "{r}"
    );
    let r = rpc(json!({"size": "16M"}));
    assert_eq!(r["result"]["capacity"], 16 * MIB, "{r}");
    assert_eq!(r["result"]["previous"], 8 * MIB, "{r}");
    // The running queue takes the new space at once.
    assert_eq!(f.write(0, 16 * MIB - 65536, 0, 65536), 0);
    assert_eq!(f.read(0, 16 * MIB - 65536, 65536, 65536), 0);
    assert_eq!(f.buf(65536, 65536), &pattern(61, 65536)[..]);
    assert_ne!(f.write(0, 16 * MIB, 0, 4096), 0, "past the new end");
    drop(f);
    let f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 16 * MIB);
    drop(f);

    // The RBD image holds the LUKS header (2 MiB) and the new payload.
    let info: serde_json::Value =
        serde_json::from_str(&ok(ceph.rbd(&["info", "--format", "json", "rbd/grown"]))).unwrap();
    assert_eq!(info["size"], 18 * MIB, "{info}");
    let status = d.terminate();
    assert!(status.success(), "{status}");

    // QEMU's own luks driver over its rbd driver agrees.
    let pass = ceph.export_passphrase(dir.path(), "grown");
    let out = qemu_io_luks(ceph, "grown", &pass, "read -v 16320k 16");
    let want: String = pattern(61, 65536)[..16]
        .iter()
        .map(|b| format!("{b:02x} "))
        .collect();
    assert!(out.contains(want.trim()), "{out}\nwant {want}");
}

/// `vmcrypt clone` refuses RBD images with the way that works instead,
/// and that way works: `rbd clone` of a protected snapshot carries the
/// LUKS header and the key descriptor (RBD copies image metadata to
/// clones), `vmcrypt rekey` gives the clone a KEK of its own, the clone
/// serves the parent's data, and the parent's key no longer opens it.
#[test]
fn clone_of_rbd_images_is_refused_and_rbd_clone_then_rekey_works() {
    let ceph = cluster();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let conf = ceph.conf.to_str().unwrap();
    let vmcrypt = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .args(["--keystore", keys.to_str().unwrap(), "--ceph-conf", conf])
            .output()
            .unwrap()
    };
    ceph.create_encrypted(dir.path(), "parent", "8M");
    {
        let d = ceph.serve(dir.path(), "parent", "rbd:rbd/parent", &[]);
        let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
        f.buf(0, 65536).copy_from_slice(&pattern(71, 65536));
        assert_eq!(f.write(0, MIB, 0, 65536), 0);
        drop(f);
        assert!(d.terminate().success());
    }
    ok(ceph.rbd(&["snap", "create", "rbd/parent@gold"]));
    ok(ceph.rbd(&["snap", "protect", "rbd/parent@gold"]));

    let out = Command::new(bin())
        .args([
            "clone",
            "rbd:rbd/parent@gold",
            "rbd:rbd/child",
            "--keystore",
        ])
        .arg(&keys)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not yet on RBD images"), "{err}");
    assert!(err.contains("rbd clone"), "{err}");
    assert!(!String::from_utf8_lossy(&ceph.rbd(&["ls", "rbd"]).stdout).contains("child"));

    // The way the message gives.
    ok(ceph.rbd(&["clone", "rbd/parent@gold", "rbd/child"]));
    let parent_pass = ceph.export_passphrase(dir.path(), "parent");
    let out = ok(vmcrypt(&["rekey", "rbd:rbd/child"]));
    assert!(out.contains("rekeyed rbd:rbd/child"), "{out}");
    let d = ceph.serve(dir.path(), "child", "rbd:rbd/child", &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.read(0, MIB, 0, 65536), 0);
    assert_eq!(f.buf(0, 65536), &pattern(71, 65536)[..]);
    drop(f);
    assert!(d.terminate().success());
    let opens = |image: &str| {
        qemu_io_luks_output(ceph, image, &parent_pass, "read 0 4k")
            .status
            .success()
    };
    assert!(opens("parent"));
    assert!(!opens("child"), "the parent's key still opens the clone");
}

/// With the OSDs down (the monitors up): a start gives up after the
/// deadline with the reason, instead of hanging in `rbd_open`; and a
/// daemon whose shutdown waits for a write that never completes ends at
/// a second SIGTERM. A cluster of its own: its OSD is stopped.
#[test]
fn osds_down_bound_a_start_and_a_second_sigterm_ends_a_stuck_shutdown() {
    let ceph = Ceph::start(false);
    let dir = tempfile::tempdir().unwrap();
    let spec = ceph.create("osdsdown", 16 * MIB);
    let d = ceph.serve(dir.path(), "stuck", &spec, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.write(0, 0, 0, 4096), 0);

    let osd: i32 = std::fs::read_to_string(ceph.dir.join("osd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the test cluster's OSD.
    unsafe { libc::kill(osd, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));

    // A start now: refused after twice --ceph-deadline.
    let t = std::time::Instant::now();
    let e = start_fails(
        dir.path(),
        &[
            "--image",
            &spec,
            "--ceph-conf",
            ceph.conf.to_str().unwrap(),
            "--ceph-deadline",
            "2",
        ],
    );
    assert!(e.contains("no answer from the OSDs"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // A write that cannot complete, then SIGTERM: the daemon waits for it.
    let p = f.ptr(0);
    f.queues[0].write(8192, p, 4096, 0, ReqFlags::empty());
    let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
    let mut no_wait = Duration::ZERO;
    f.queues[0]
        .do_io(&mut none, 0, Some(&mut no_wait), None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(d.child_alive(), "the shutdown did not wait for the write");
    d.wait_for_log("a second signal ends the daemon");
    d.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.child_alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "a second SIGTERM did not end the daemon:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log_text().contains("second signal"), "{}", d.log_text());
    drop(f);
}
