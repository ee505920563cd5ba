//! Real PyKMIP servers for tests, on free loopback ports, run through
//! `ci/kms.sh serve` from the set-up made by `ci/kms.sh setup`
//! (`$VMCRYPT_KMS_DIR`, default `target/kms`).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The set-up folder (venv, certificates), made once.
pub fn kms_dir() -> PathBuf {
    let dir = std::env::var_os("VMCRYPT_KMS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/kms"));
    if !dir.join("client.crt").exists() || !dir.join("venv/bin/pykmip-server").exists() {
        let st = Command::new("bash")
            .arg(workspace().join("ci/kms.sh"))
            .arg("setup")
            .arg(&dir)
            .status()
            .expect("ci/kms.sh setup");
        assert!(st.success(), "ci/kms.sh setup failed");
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PyKMIP server, stopped (SIGINT, then SIGKILL) when dropped.
pub struct KmsServer {
    pub port: u16,
    child: Option<Child>,
    pub db_dir: PathBuf,
}

impl KmsServer {
    /// Starts a server with its own database in `state` (a temp folder).
    pub fn start(state: &Path) -> KmsServer {
        Self::start_on(state, free_port())
    }

    pub fn start_on(state: &Path, port: u16) -> KmsServer {
        let dir = kms_dir();
        // Each server gets its own folder (database, log) with links to the PKI.
        let sdir = state.join(format!("kms-{port}"));
        std::fs::create_dir_all(&sdir).unwrap();
        for f in ["ca.crt", "server.crt", "server.key", "venv", "policies"] {
            let link = sdir.join(f);
            if !link.exists() {
                std::os::unix::fs::symlink(dir.join(f), &link).unwrap();
            }
        }
        let child = Command::new("bash")
            .arg(workspace().join("ci/kms.sh"))
            .arg("serve")
            .arg(&sdir)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start PyKMIP");
        let mut s = KmsServer {
            port,
            child: Some(child),
            db_dir: sdir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("PyKMIP exited ({st}); see {}", s.db_dir.display());
                }
            }
            assert!(
                Instant::now() < deadline,
                "PyKMIP did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn addr(&self) -> String {
        format!("localhost:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for KmsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a vmcrypt KMS config for `servers` into `dir`; `client` picks the
/// certificate pair ("client", or "other-client" from another CA).
pub fn kms_config(dir: &Path, servers: &[String], client: &str) -> PathBuf {
    let k = kms_dir();
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "[kms]\nservers = [{}]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\ntimeout_ms = 3000\n",
        list.join(", "),
        k.join("ca.crt").display(),
        k.join(format!("{client}.crt")).display(),
        k.join(format!("{client}.key")).display(),
    );
    let path = dir.join(format!("kms-{client}-{}.toml", servers.len()));
    std::fs::write(&path, text).unwrap();
    path
}
