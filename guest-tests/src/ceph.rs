//! A throwaway single-node Ceph cluster (`ci/ceph.sh`) for RBD disks.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Stopped and removed when dropped.
pub struct Ceph {
    pub dir: PathBuf,
    pub conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/ceph.sh")
}

impl Ceph {
    pub fn start() -> Result<Ceph, String> {
        let dir = tempfile::Builder::new()
            .prefix("vmcrypt-ceph")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .env("CEPH_PORT", port.to_string())
            .output()
            .map_err(|e| format!("ci/ceph.sh: {e}"))?;
        let c = Ceph {
            conf: dir.join("ceph.conf"),
            dir,
        };
        if !out.status.success() {
            return Err(format!(
                "ci/ceph.sh start: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(c)
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
