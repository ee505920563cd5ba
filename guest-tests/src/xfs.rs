//! An XFS file system with reflinks on a loop device, for snapshots.

use std::path::PathBuf;
use std::process::Command;

/// Mounted in a temporary folder; unmounted when dropped. Needs root and
/// xfsprogs (ci/install-deps.sh installs it).
pub struct Xfs {
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl Xfs {
    /// A sparse file system of `size` bytes.
    pub fn mount(size: u64) -> Result<Xfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("{}: {e}", img.display()))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        Ok(Xfs { _dir: dir, mnt })
    }
}

fn run(c: &mut Command) -> Result<(), String> {
    let out = c
        .output()
        .map_err(|e| format!("{c:?}: {e} (install xfsprogs: ci/install-deps.sh)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{c:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
