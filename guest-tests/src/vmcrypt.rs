//! Running `vmcrypt serve` for a guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::guest::target_dir;

/// The vmcrypt binary of this workspace, built (once per process) if needed.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VMCRYPT_BIN") {
            return p.into();
        }
        let release = !cfg!(debug_assertions);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.args(["build", "-q", "-p", "vmcrypt", "--bin", "vmcrypt"]);
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("cargo build -p vmcrypt");
        assert!(st.success(), "building vmcrypt failed");
        let dir = target_dir().join(if release { "release" } else { "debug" });
        std::fs::canonicalize(dir.join("vmcrypt")).expect("vmcrypt binary")
    })
    .clone()
}

/// `vmcrypt create` an encrypted image `dir/name` of `size` (e.g. "256M"),
/// its KEK in the local key store `dir/keys`.
pub fn create_encrypted(dir: &Path, name: &str, size: &str) -> Result<PathBuf, String> {
    let img = dir.join(name);
    create(img.as_os_str(), size, dir, &[])?;
    Ok(img)
}

/// `vmcrypt create` an encrypted RBD image `spec` (e.g. "rbd:rbd/disk")
/// of `size` on the cluster of `ceph_conf`, its KEK in the local key store
/// `dir/keys`.
pub fn create_encrypted_rbd(
    dir: &Path,
    spec: &str,
    size: &str,
    ceph_conf: &Path,
) -> Result<(), String> {
    create(
        spec.as_ref(),
        size,
        dir,
        &["--ceph-conf".as_ref(), ceph_conf.as_os_str()],
    )
}

/// `vmcrypt create IMAGE --size SIZE --keystore DIR/keys EXTRA...`.
fn create(
    image: &std::ffi::OsStr,
    size: &str,
    dir: &Path,
    extra: &[&std::ffi::OsStr],
) -> Result<(), String> {
    let out = Command::new(binary())
        .arg("create")
        .arg(image)
        .args(["--size", size, "--keystore"])
        .arg(dir.join("keys"))
        .args(extra)
        .output()
        .map_err(|e| format!("vmcrypt create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vmcrypt create {}: {}",
            image.to_string_lossy(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// What vmcrypt logs once it listens.
const READY: &str = "waiting for a frontend";

/// A running `vmcrypt serve`, stopped when dropped.
pub struct Vmcrypt {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Vmcrypt {
    /// Starts `vmcrypt serve --socket DIR/NAME.sock ARGS...` and waits until it listens.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Result<Vmcrypt, String> {
        let socket = dir.join(format!("{name}.sock"));
        Self::start_on(&socket, dir, name, args)
    }

    pub fn start_on(
        socket: &Path,
        dir: &Path,
        name: &str,
        args: &[&str],
    ) -> Result<Vmcrypt, String> {
        let log = dir.join(format!("{name}.log"));
        // The log is appended to across restarts: wait for a new ready line.
        let ready_before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(READY)
            .count();
        let child = Command::new(binary())
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .map_err(|e| format!("starting vmcrypt: {e}"))?;
        let mut v = Vmcrypt {
            child,
            socket: socket.into(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = v.log_text();
            if log.matches(READY).count() > ready_before {
                break;
            }
            if let Ok(Some(st)) = v.child.try_wait() {
                return Err(format!("vmcrypt exited ({st}): {log}"));
            }
            if Instant::now() > deadline {
                return Err(format!("vmcrypt did not start: {log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(v)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would: nothing is completed or flushed.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    /// Sends SIGTERM and waits up to 30 s for the exit status; a failure
    /// prints the daemon's log.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            eprintln!(
                "vmcrypt exited with {status}; its log:\n{}",
                self.log_text()
            );
        }
        status
    }
}

impl Drop for Vmcrypt {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
