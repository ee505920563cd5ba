//! Preparing the guest: kernel and a base initramfs, built once and cached.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the recipe changes, so cached guests are rebuilt.
const RECIPE: &str = "3";

/// The virtio modules the cloud kernel needs for a vhost-user-blk disk, in load order.
const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Host programs copied into the guest with the libraries they need.
const PROGRAMS: [&str; 5] = [
    "/usr/bin/fio",
    "/usr/sbin/mkfs.ext4",
    "/usr/sbin/e2fsck",
    "/usr/sbin/blkdiscard",
    "/usr/sbin/blockdev",
];

/// The guest's first process: sets up the system, loads the virtio
/// modules, runs /test.sh (added per test) and powers off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /mnt
for m in MODULES; do
  for i in 1 2 3 4 5 6 7 8 9 10; do
    grep -q "^$m " /proc/modules && break
    insmod /lib/modules/$m.ko 2>/dev/null && break
    sleep 0.2
  done
done
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "=== GUEST-READY"
if [ -f /test.sh ]; then sh /test.sh; rc=$?; else rc=0; fi
echo "=== GUEST-EXIT rc=$rc"
sync
poweroff -f
"#;

/// A prepared guest: kernel and base initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub dir: PathBuf,
}

/// The workspace's target folder.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn sh(script: &str, dir: &Path) -> Result<String, String> {
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir))
}

impl GuestImage {
    /// Returns the cached guest, building it first if needed (safe to call
    /// from several test processes at once).
    pub fn prepare() -> Result<GuestImage, String> {
        let dir = target_dir().join("guest");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = std::fs::canonicalize(&dir).unwrap();
        let lock = std::fs::File::create(dir.join(".lock")).map_err(|e| e.to_string())?;
        // SAFETY: flock on a file we hold open; released when it is closed.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let img = GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("base.cpio.gz"),
            dir: dir.clone(),
        };
        let stamp = dir.join("ready");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(RECIPE) && img.initrd.exists() {
            return Ok(img);
        }
        img.build()?;
        std::fs::write(&stamp, RECIPE).map_err(|e| e.to_string())?;
        Ok(img)
    }

    fn build(&self) -> Result<(), String> {
        let dir = &self.dir;
        let _ = std::fs::remove_dir_all(dir.join("pkg"));
        let _ = std::fs::remove_dir_all(dir.join("root"));
        std::fs::create_dir_all(dir.join("pkg")).unwrap();
        // The newest Debian cloud kernel, as the metapackage names it.
        let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
        let pkg = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .ok_or("apt-cache: no kernel behind linux-image-cloud-amd64 (run apt-get update)")?
            .to_string();
        run(Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(dir.join("pkg")))?;
        sh("dpkg -x ./*.deb x && rm -f ./*.deb", &dir.join("pkg"))?;
        let boot = dir.join("pkg/x/boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
            .ok_or("no vmlinuz in the kernel package")?;
        std::fs::copy(vmlinuz.path(), &self.kernel).map_err(|e| e.to_string())?;

        // The root: busybox, modules, programs and their libraries.
        let root = dir.join("root");
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "lib/modules",
            "proc",
            "sys",
            "dev",
            "tmp",
            "mnt",
            "etc",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .map_err(|e| format!("/bin/busybox (install busybox-static): {e}"))?;
        for m in MODULES {
            let found = run(Command::new("find")
                .arg(dir.join("pkg/x/lib/modules"))
                .args(["-name", &format!("{m}.ko")]))?;
            let path = found
                .lines()
                .next()
                .ok_or(format!("module {m} not in the kernel package"))?;
            std::fs::copy(path, root.join(format!("lib/modules/{m}.ko")))
                .map_err(|e| e.to_string())?;
        }
        for prog in PROGRAMS {
            if !Path::new(prog).exists() {
                return Err(format!(
                    "{prog} missing on the host (see ci/install-deps.sh)"
                ));
            }
            let dest = root.join(prog.trim_start_matches('/'));
            std::fs::copy(prog, &dest).map_err(|e| format!("{prog}: {e}"))?;
            let libs = run(Command::new("ldd").arg(prog))?;
            for lib in libs.lines().filter_map(|l| {
                let l = l.trim();
                l.split("=> ")
                    .nth(1)
                    .map(|r| r.split(' ').next().unwrap_or(""))
                    .or_else(|| {
                        l.starts_with('/')
                            .then(|| l.split(' ').next().unwrap_or(""))
                    })
            }) {
                if lib.is_empty() {
                    continue;
                }
                let dest = root.join(lib.trim_start_matches('/'));
                if !dest.exists() {
                    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                    std::fs::copy(lib, &dest).map_err(|e| format!("{lib}: {e}"))?;
                }
            }
        }
        // The dynamic loader where binaries look for it.
        sh(
            "mkdir -p lib64 && cp -L /lib64/ld-linux-x86-64.so.2 lib64/",
            &root,
        )?;
        let init = INIT.replace("MODULES", &MODULES.join(" "));
        std::fs::write(root.join("init"), init).unwrap();
        sh("chmod 755 init && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > ../base.cpio.gz", &root)?;
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(dir.join("pkg"));
        Ok(())
    }

    /// An initramfs for one run: the base plus `/test.sh`.
    pub fn with_script(&self, script: &str, work: &Path) -> Result<PathBuf, String> {
        let root = work.join("script-root");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("test.sh"), script).unwrap();
        let extra = work.join("script.cpio.gz");
        sh(
            &format!(
                "find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
                extra.display()
            ),
            &root,
        )?;
        let initrd = work.join("initrd.cpio.gz");
        let mut bytes = std::fs::read(&self.initrd).map_err(|e| e.to_string())?;
        bytes.extend(std::fs::read(&extra).map_err(|e| e.to_string())?);
        std::fs::write(&initrd, bytes).map_err(|e| e.to_string())?;
        Ok(initrd)
    }
}
