//! Which QEMU boots a guest.
//!
//! Most guests run on the host's `qemu-system-x86_64`: Debian 12's QEMU 7.2,
//! as operators of this release run it. Live migration is the exception.
//! Under TCG, QEMU 7.2 breaks about one guest in five across a migration on
//! these machines, with its own virtio-blk and no vmcrypt at all (the control
//! test in `tests/lifecycle.rs`); QEMU 10.0 broke none (docs/lifecycle.md, Restarts,
//! crashes and live migration). So the migration tests run on QEMU 10.0 from
//! bookworm-backports, the QEMU of Debian 13. It is fetched once with apt,
//! which checks the archive's signatures against the host's Debian keyring,
//! and unpacked under `target/`; nothing on the host is installed or replaced.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use crate::guest::{sh, target_dir};

/// A QEMU system emulator and the folders it loads firmware from (`-L`).
#[derive(Clone, Debug)]
pub struct Qemu {
    pub binary: PathBuf,
    pub data_dirs: Vec<PathBuf>,
}

/// The suite the migration tests' QEMU comes from, and its packages.
const SUITE: &str = "bookworm-backports";
const PACKAGES: [&str; 3] = ["qemu-system-x86", "qemu-system-data", "seabios"];

/// Where the packages are unpacked, under the target folder. A change to
/// [`SUITE`] or [`PACKAGES`] needs a new name.
const DIR: &str = "qemu-bookworm-backports";

impl Qemu {
    /// The host's `qemu-system-x86_64`, found on `PATH`.
    pub fn host() -> Qemu {
        Qemu {
            binary: "qemu-system-x86_64".into(),
            data_dirs: vec![],
        }
    }

    /// The QEMU guests run on: `VMCRYPT_GUEST_QEMU` if set (see
    /// [`Qemu::from_env`]), else the host's.
    pub fn for_guests() -> Result<Qemu, String> {
        Qemu::from_env("VMCRYPT_GUEST_QEMU").unwrap_or(Ok(Qemu::host()))
    }

    /// The QEMU the migration tests run on: `VMCRYPT_MIGRATION_QEMU` if set
    /// (see [`Qemu::from_env`]), else QEMU 10.0 from bookworm-backports.
    pub fn for_migration() -> Result<Qemu, String> {
        Qemu::from_env("VMCRYPT_MIGRATION_QEMU").unwrap_or_else(Qemu::backports)
    }

    /// The QEMU environment variable `var` names, if it is set: `host` for
    /// the host's, `backports` for QEMU 10.0 from bookworm-backports, or
    /// the path of a `qemu-system-x86_64`.
    fn from_env(var: &str) -> Option<Result<Qemu, String>> {
        let v = std::env::var(var).ok()?;
        Some(match v.as_str() {
            "host" => Ok(Qemu::host()),
            "backports" => Qemu::backports(),
            _ => Ok(Qemu {
                binary: v.into(),
                data_dirs: vec![],
            }),
        })
    }

    /// QEMU 10.0 from bookworm-backports, fetched on first use. Safe to call
    /// from several test processes at once.
    pub fn backports() -> Result<Qemu, String> {
        let dir = target_dir().join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = std::fs::canonicalize(&dir).map_err(|e| e.to_string())?;
        let lock = std::fs::File::create(dir.join(".lock")).map_err(|e| e.to_string())?;
        // SAFETY: flock on a file this function holds open; released when it
        // is closed at return.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let root = dir.join("root");
        let qemu = Qemu {
            binary: root.join("usr/bin/qemu-system-x86_64"),
            // SeaBIOS first: the host's /usr/share/qemu links to the host's
            // older SeaBIOS, which QEMU would otherwise find there.
            data_dirs: vec![root.join("usr/share/seabios"), root.join("usr/share/qemu")],
        };
        if !dir.join("ready").exists() {
            fetch(&dir)?;
            std::fs::write(dir.join("ready"), "").map_err(|e| e.to_string())?;
        }
        qemu.check()?;
        Ok(qemu)
    }

    /// The `-L` arguments for [`Qemu::data_dirs`].
    pub fn data_args(&self) -> Vec<String> {
        self.data_dirs
            .iter()
            .flat_map(|d| ["-L".to_string(), d.display().to_string()])
            .collect()
    }

    /// Fails with the missing libraries if the binary cannot start here.
    fn check(&self) -> Result<(), String> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        if !out.status.success() {
            let ldd = Command::new("ldd")
                .arg(&self.binary)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let missing: Vec<&str> = ldd.lines().filter(|l| l.contains("not found")).collect();
            return Err(format!(
                "{} does not start ({}): {}{}",
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                if missing.is_empty() {
                    String::new()
                } else {
                    format!("; missing libraries (install the host's qemu-system-x86, ci/install-deps.sh): {}", missing.join(", "))
                }
            ));
        }
        // The suite moves with Debian 13's QEMU: say which one ran.
        let version = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "{}: {}",
            self.binary.display(),
            version.lines().next().unwrap_or("").trim()
        );
        Ok(())
    }
}

/// Downloads [`PACKAGES`] from [`SUITE`] with apt, using its own package
/// lists in `dir` (the host's apt configuration and state stay as they are),
/// and unpacks them into `dir/root`.
fn fetch(dir: &std::path::Path) -> Result<(), String> {
    let script = format!(
        r#"
rm -rf lists cache parts debs root
mkdir -p lists/partial cache/archives/partial parts debs
echo "deb http://deb.debian.org/debian {SUITE} main" > sources.list
set -- -q -o Dir::Etc::SourceList="$PWD/sources.list" -o Dir::Etc::SourceParts="$PWD/parts" \
  -o Dir::State::Lists="$PWD/lists" -o Dir::Cache="$PWD/cache" -o Debug::NoLocking=1 \
  -o APT::Sandbox::User=root
apt-get "$@" update
cd debs
apt-get "$@" download {pkgs}
for d in ./*.deb; do dpkg -x "$d" ../root; done
cd .. && rm -rf debs lists cache
"#,
        pkgs = PACKAGES
            .iter()
            .map(|p| format!("{p}/{SUITE}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    sh(&script, dir).map_err(|e| format!("fetching QEMU from {SUITE}: {e}"))?;
    Ok(())
}
