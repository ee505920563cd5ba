//! `vmcrypt serve` settings: from the command line and an optional TOML
//! file, flags winning over the file, checked into a [`ServeConfig`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::filter::FilterSpec;
use crate::listen::SocketSpec;

/// Errors in the settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("missing --{0} (or '{0}' in the config file)")]
    Missing(&'static str),
    #[error("--{option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Filter(#[from] crate::filter::FilterError),
}

fn invalid(option: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        reason: reason.into(),
    }
}

/// How the image uses the host's page cache.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    #[default]
    Writeback,
    None,
}

/// The options of `vmcrypt serve`, as given on the command line or in the
/// config file (same names, in kebab-case, in the file).
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeOptions {
    /// The disk image to serve: a file or block device, `rbd:POOL/IMAGE`
    /// (or `rbd:POOL/NAMESPACE/IMAGE`, and `@SNAPSHOT` with --read-only) for
    /// a Ceph RBD image through librbd,
    /// or `null:SIZE` for a device that reads zeroes and drops writes (e.g.
    /// `null:1G`).
    #[arg(long, value_name = "PATH|rbd:POOL/IMAGE|null:SIZE")]
    pub image: Option<String>,

    /// The unix socket QEMU connects to (`-chardev socket,path=...`).
    /// Without it (and without --socket-fd), a socket passed by systemd
    /// socket activation (LISTEN_FDS) is used.
    #[arg(long, value_name = "PATH", conflicts_with = "socket_fd")]
    pub socket: Option<PathBuf>,

    /// Serve on this inherited, already listening unix socket instead of
    /// binding --socket (qemu-storage-daemon's addr.type=fd).
    #[arg(long, value_name = "FD")]
    #[serde(skip)]
    pub socket_fd: Option<i32>,

    /// Queues offered to the guest, one worker thread each [default: 4].
    /// QEMU under libvirt asks for one per vCPU.
    #[arg(long, value_name = "N")]
    pub num_queues: Option<u16>,

    /// Largest virtqueue size accepted [default: 1024].
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u16>,

    /// Host page cache use, QEMU's names: `writeback` (the host caches the
    /// image; FLUSH makes writes durable) or `none` (O_DIRECT: no host copy,
    /// for production and shared storage) [default: writeback].
    #[arg(long, value_enum, value_name = "MODE")]
    pub cache: Option<CacheMode>,

    /// Serve the disk read-only: the guest sees a read-only disk and writes fail.
    #[arg(long)]
    #[serde(default)]
    pub read_only: bool,

    /// Serial number the guest reads (up to 20 bytes) [default: image file name].
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,

    /// Logical block size the guest sees, 512 or 4096 [default: 512].
    #[arg(long, value_name = "BYTES")]
    pub logical_block_size: Option<u32>,

    /// A filter to put in the pipeline, in order: `stats`, or
    /// `throttle:total_iops_sec=N,read_bytes_sec=N,...` (libvirt <iotune>
    /// names; each limit also takes `<name>_burst`). Repeatable.
    #[arg(long = "filter", value_name = "NAME[:k=v,...]")]
    #[serde(default, rename = "filters")]
    pub filters: Vec<String>,

    /// Longest time a queue thread busy-polls for new requests (and, with
    /// `--cache none`, for the completions of up to 4 requests at the
    /// device) before it sleeps, in microseconds; the window adapts to the
    /// load [default: 32]. 0 never polls (least CPU, higher latency).
    #[arg(long, value_name = "US")]
    pub poll_us: Option<u64>,

    /// Control socket (JSON-RPC 2.0, one object per line): status,
    /// query-stats, metrics, set-throttle, resize, snapshot. It is the
    /// daemon's admin API: its mode is --control-mode (not --socket-mode),
    /// and only the users of --control-allow-uid may call it. `vmcrypt ctl`
    /// and `vmcrypt top` are its clients.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Permissions of the control socket, octal [default: 0600]. Keep QEMU's
    /// group out: a guest that subverts QEMU must not reach the admin API.
    #[arg(long, value_name = "MODE")]
    pub control_mode: Option<String>,

    /// Group to give the control socket (with --control-mode 0660; the
    /// caller's uid must still be allowed by --control-allow-uid).
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// A user (name or uid) allowed to call the control socket, checked
    /// with the peer's credentials (SO_PEERCRED). Repeatable [default: the
    /// daemon's own user and root].
    #[arg(long = "control-allow-uid", value_name = "USER")]
    #[serde(default)]
    pub control_allow_uid: Vec<String>,

    /// Folder where `snapshot` creates its files (a snapshot is named by
    /// one file name, created in this folder only) [default: the image's
    /// folder].
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Serve the counters for Prometheus at http://ADDR:PORT/metrics (e.g.
    /// 127.0.0.1:9864). Plain HTTP without authentication, read-only: bind
    /// it to a loopback or management address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,

    /// Permissions of the socket, octal [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,

    /// Group to give the socket (e.g. libvirt-qemu's group, with --socket-mode 0660).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Local key store folder for encrypted images [default: the one the
    /// image's key descriptor names, else $XDG_DATA_HOME/vmcrypt/keys].
    #[arg(long, value_name = "DIR")]
    pub keystore: Option<PathBuf>,

    /// How to serve the image: `luks` (decrypted, with its key) or `raw`
    /// [default: luks when the image has a key descriptor or
    /// --passphrase-file is given, else raw]. Never taken from the image's
    /// bytes: a raw disk whose guest put its own LUKS on it needs `raw`.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<crate::keys::ImageFormat>,

    /// Open an encrypted (LUKS1) image with the passphrase in this file
    /// instead of its key descriptor: for images made by cryptsetup or
    /// qemu-img, or for recovery.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,

    /// Refuse LUKS headers that ask more PBKDF2 iterations than this of a
    /// key slot or the master-key digest [default: 16777216, about 10 s]:
    /// a damaged or hostile header could otherwise ask for hours.
    #[arg(long, value_name = "N")]
    pub max_pbkdf2_iterations: Option<u32>,

    /// KMS configuration file (`[kms]` table: servers, ca, client_cert,
    /// client_key, timeout_ms): fetch the image's key-encryption key from
    /// these KMIP servers. Without it, keys come from the local key store.
    #[arg(long, value_name = "FILE")]
    pub kms: Option<PathBuf>,

    /// How long to keep retrying unreachable KMS servers at start, in
    /// seconds, before giving up [default: 30].
    #[arg(long, value_name = "SECS")]
    pub kms_deadline: Option<u64>,

    /// For an rbd: image, the Ceph configuration (monitors, auth, keyring)
    /// [default: /etc/ceph/ceph.conf].
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,

    /// For an rbd: image, the cephx user without "client." (its keyring is
    /// found through the Ceph configuration) [default: admin].
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,

    /// For an rbd: image, how long to keep trying to reach the monitors at
    /// start, in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub ceph_deadline: Option<u64>,

    /// Syscall filter installed once started: `on` (a syscall outside
    /// vmcrypt's allow-list ends the daemon, naming it), `log` (allowed, but
    /// recorded in the kernel's audit log) or `off` [default: on].
    #[arg(long, value_enum, value_name = "MODE")]
    pub seccomp: Option<crate::seccomp::SeccompMode>,

    /// Log level: error, warn, info, debug or trace [default: info; RUST_LOG also works].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Read settings from this TOML file; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl ServeOptions {
    /// Reads the config file, if any, and merges it under these options.
    pub fn merged(self) -> Result<ServeOptions, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = load_file(&path)?;
        Ok(ServeOptions {
            image: self.image.or(file.image),
            // A descriptor on the command line, or one systemd passed, wins
            // over the file's path.
            socket: match self.socket_fd {
                Some(_) => self.socket,
                None if crate::listen::activation_requested() => self.socket,
                None => self
                    .socket
                    .or_else(|| file.socket.map(|p| relative_to(&path, p))),
            },
            socket_fd: self.socket_fd,
            num_queues: self.num_queues.or(file.num_queues),
            queue_size: self.queue_size.or(file.queue_size),
            read_only: self.read_only || file.read_only,
            serial: self.serial.or(file.serial),
            logical_block_size: self.logical_block_size.or(file.logical_block_size),
            filters: if self.filters.is_empty() {
                file.filters
            } else {
                self.filters
            },
            poll_us: self.poll_us.or(file.poll_us),
            control: self
                .control
                .or_else(|| file.control.map(|p| relative_to(&path, p))),
            control_mode: self.control_mode.or(file.control_mode),
            control_group: self.control_group.or(file.control_group),
            control_allow_uid: if self.control_allow_uid.is_empty() {
                file.control_allow_uid
            } else {
                self.control_allow_uid
            },
            snapshot_dir: self
                .snapshot_dir
                .or_else(|| file.snapshot_dir.map(|p| relative_to(&path, p))),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            socket_mode: self.socket_mode.or(file.socket_mode),
            socket_group: self.socket_group.or(file.socket_group),
            log_level: self.log_level.or(file.log_level),
            format: self.format.or(file.format),
            cache: self.cache.or(file.cache),
            keystore: self
                .keystore
                .or_else(|| file.keystore.map(|p| relative_to(&path, p))),
            passphrase_file: self
                .passphrase_file
                .or_else(|| file.passphrase_file.map(|p| relative_to(&path, p))),
            kms: self.kms.or_else(|| file.kms.map(|p| relative_to(&path, p))),
            kms_deadline: self.kms_deadline.or(file.kms_deadline),
            ceph_conf: self
                .ceph_conf
                .or_else(|| file.ceph_conf.map(|p| relative_to(&path, p))),
            ceph_id: self.ceph_id.or(file.ceph_id),
            ceph_deadline: self.ceph_deadline.or(file.ceph_deadline),
            max_pbkdf2_iterations: self.max_pbkdf2_iterations.or(file.max_pbkdf2_iterations),
            seccomp: self.seccomp.or(file.seccomp),
            config: Some(path),
        })
    }
}

fn load_file(path: &Path) -> Result<ServeOptions, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })
}

/// Paths in a config file are relative to the file's folder.
fn relative_to(config: &Path, p: PathBuf) -> PathBuf {
    match config.parent() {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

/// What to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSpec {
    Null { size: u64 },
    File(PathBuf),
    Rbd(crate::rbd::RbdSpec),
}

/// Checked settings for `serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub image: ImageSpec,
    pub format: Option<crate::keys::ImageFormat>,
    pub cache: CacheMode,
    pub socket: SocketSpec,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub serial: String,
    pub block_size: u32,
    pub filters: Vec<FilterSpec>,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub control: Option<PathBuf>,
    pub control_mode: u32,
    pub control_group: Option<String>,
    /// The uids allowed to call the control socket.
    pub control_allow: Vec<u32>,
    /// Where snapshots are created (None: beside the image file).
    pub snapshot_dir: Option<PathBuf>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub poll_us: u64,
    pub keys: crate::keys::KeySource,
    pub seccomp: crate::seccomp::SeccompMode,
    /// How to reach the cluster of an rbd: image.
    pub ceph: crate::rbd::CephOptions,
}

impl TryFrom<ServeOptions> for ServeConfig {
    type Error = ConfigError;

    fn try_from(o: ServeOptions) -> Result<Self, ConfigError> {
        let image = match o.image.ok_or(ConfigError::Missing("image"))? {
            s if s.starts_with("null:") => ImageSpec::Null {
                size: parse_size(&s["null:".len()..]).map_err(|e| invalid("image", e))?,
            },
            s if s.starts_with("rbd:") => ImageSpec::Rbd(
                crate::rbd::RbdSpec::parse(&s["rbd:".len()..]).map_err(|e| invalid("image", e))?,
            ),
            s if s.is_empty() => return Err(invalid("image", "empty path")),
            s => ImageSpec::File(s.into()),
        };
        let socket = match (o.socket, o.socket_fd) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "socket-fd",
                    "give --socket or --socket-fd, not both",
                ))
            }
            (Some(path), None) => SocketSpec::Path(path),
            (None, Some(fd)) if fd < 0 => return Err(invalid("socket-fd", "not a descriptor")),
            (None, Some(fd)) => SocketSpec::Fd(fd),
            (None, None) if crate::listen::activation_requested() => SocketSpec::Activated,
            (None, None) => return Err(ConfigError::Missing("socket")),
        };
        let num_queues = o.num_queues.unwrap_or(4);
        if !(1..=64).contains(&num_queues) {
            return Err(invalid("num-queues", "must be between 1 and 64"));
        }
        let queue_size = o.queue_size.unwrap_or(1024);
        if !(2..=32768).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(invalid(
                "queue-size",
                "must be a power of two from 2 to 32768",
            ));
        }
        let block_size = o.logical_block_size.unwrap_or(512);
        if block_size != 512 && block_size != 4096 {
            return Err(invalid("logical-block-size", "must be 512 or 4096"));
        }
        if let ImageSpec::Null { size } = image {
            if size == 0 || size % u64::from(block_size) != 0 {
                return Err(invalid(
                    "image",
                    format!("null device size must be a positive multiple of {block_size}"),
                ));
            }
        }
        let serial = match o.serial {
            Some(s) if s.len() > 20 => return Err(invalid("serial", "at most 20 bytes")),
            Some(s) => s,
            None => match &image {
                ImageSpec::File(p) => {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    let mut name = name.unwrap_or_default();
                    while name.len() > 20 {
                        name.pop();
                    }
                    name
                }
                ImageSpec::Null { .. } => "vmcrypt-null".into(),
                ImageSpec::Rbd(r) => {
                    let mut name = r.image.clone();
                    while name.len() > 20 {
                        name.pop();
                    }
                    name
                }
            },
        };
        let socket_mode = parse_mode("socket-mode", o.socket_mode.as_deref())?;
        let control_mode = parse_mode("control-mode", o.control_mode.as_deref())?;
        let control_allow = if o.control_allow_uid.is_empty() {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if me == 0 {
                vec![0]
            } else {
                vec![me, 0]
            }
        } else {
            o.control_allow_uid
                .iter()
                .map(|u| {
                    crate::listen::lookup_user(u)
                        .ok_or_else(|| invalid("control-allow-uid", format!("unknown user '{u}'")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let filters = o
            .filters
            .iter()
            .map(|f| f.parse::<FilterSpec>())
            .collect::<Result<Vec<_>, _>>()?;
        if let ImageSpec::Rbd(r) = &image {
            if r.snapshot.is_some() && !o.read_only {
                return Err(invalid(
                    "image",
                    format!("{r}: an RBD snapshot is read-only; add --read-only"),
                ));
            }
        }
        if matches!(image, ImageSpec::Null { .. })
            && o.format == Some(crate::keys::ImageFormat::Luks)
        {
            return Err(invalid("format", "a null device cannot be LUKS"));
        }
        Ok(ServeConfig {
            image,
            format: o.format,
            cache: o.cache.unwrap_or(CacheMode::Writeback),
            socket,
            num_queues,
            queue_size,
            read_only: o.read_only,
            serial,
            block_size,
            filters,
            socket_mode,
            socket_group: o.socket_group,
            control: o.control,
            control_mode,
            control_group: o.control_group,
            control_allow,
            snapshot_dir: o.snapshot_dir,
            metrics_listen: o
                .metrics_listen
                .map(|a| {
                    a.parse().map_err(|e| {
                        invalid(
                            "metrics-listen",
                            format!("'{a}': {e} (expected ADDR:PORT, e.g. 127.0.0.1:9864)"),
                        )
                    })
                })
                .transpose()?,
            keys: crate::keys::KeySource {
                passphrase_file: o.passphrase_file,
                keystore: o.keystore,
                kms: o.kms,
                kms_deadline: std::time::Duration::from_secs(o.kms_deadline.unwrap_or(30)),
                max_iterations: o
                    .max_pbkdf2_iterations
                    .unwrap_or(vmcrypt_crypto::luks::DEFAULT_MAX_ITERATIONS),
            },
            seccomp: o.seccomp.unwrap_or_default(),
            ceph: crate::rbd::CephOptions {
                conf: o.ceph_conf.unwrap_or_else(|| "/etc/ceph/ceph.conf".into()),
                id: o.ceph_id,
                deadline: std::time::Duration::from_secs(o.ceph_deadline.unwrap_or(30)),
            },
            poll_us: match o.poll_us.unwrap_or(32) {
                us if us <= 1000 => us,
                _ => return Err(invalid("poll-us", "at most 1000")),
            },
        })
    }
}

/// Parses an octal file mode such as `0660` [default: 0600].
fn parse_mode(option: &'static str, m: Option<&str>) -> Result<u32, ConfigError> {
    match m {
        None => Ok(0o600),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| invalid(option, format!("'{m}' is not an octal mode like 0660"))),
    }
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024,
/// optionally followed by `iB` or `B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("'{s}': unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(
            &path,
            "image = \"null:1M\"\nsocket = \"s.sock\"\nnum-queues = 2\nread-only = true\nfilters = [\"stats\"]\nsocket-mode = \"0660\"\n",
        )
        .unwrap();
        let cli = ServeOptions {
            num_queues: Some(3),
            config: Some(path),
            ..Default::default()
        };
        let cfg = ServeConfig::try_from(cli.merged().unwrap()).unwrap();
        assert_eq!(cfg.image, ImageSpec::Null { size: 1 << 20 });
        assert_eq!(cfg.socket, SocketSpec::Path(dir.path().join("s.sock")));
        assert_eq!(cfg.num_queues, 3);
        assert!(cfg.read_only);
        assert_eq!(cfg.filters.len(), 1);
        assert_eq!(cfg.socket_mode, 0o660);
    }

    #[test]
    fn bad_settings_are_named() {
        let base = || ServeOptions {
            image: Some("null:1M".into()),
            socket: Some("s".into()),
            ..Default::default()
        };
        let err = |o: ServeOptions| ServeConfig::try_from(o).unwrap_err().to_string();
        assert!(err(ServeOptions {
            image: None,
            ..base()
        })
        .contains("--image"));
        assert!(err(ServeOptions {
            num_queues: Some(0),
            ..base()
        })
        .contains("num-queues"));
        assert!(err(ServeOptions {
            queue_size: Some(100),
            ..base()
        })
        .contains("queue-size"));
        assert!(err(ServeOptions {
            logical_block_size: Some(1024),
            ..base()
        })
        .contains("block-size"));
        assert!(err(ServeOptions {
            socket_mode: Some("rw".into()),
            ..base()
        })
        .contains("socket-mode"));
        assert!(err(ServeOptions {
            image: Some("null:1000".into()),
            ..base()
        })
        .contains("multiple"));
        assert!(err(ServeOptions {
            filters: vec!["x:y".into()],
            ..base()
        })
        .contains("key=value"));
        assert!(err(ServeOptions {
            socket_fd: Some(3),
            ..base()
        })
        .contains("not both"));
        assert!(err(ServeOptions {
            socket: None,
            socket_fd: Some(-1),
            ..base()
        })
        .contains("socket-fd"));
    }

    #[test]
    fn a_socket_fd_on_the_command_line_wins_over_the_files_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, "image = \"null:1M\"\nsocket = \"s.sock\"\n").unwrap();
        let o = ServeOptions {
            socket_fd: Some(7),
            config: Some(path),
            ..Default::default()
        };
        let cfg = ServeConfig::try_from(o.merged().unwrap()).unwrap();
        assert_eq!(cfg.socket, SocketSpec::Fd(7));
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, "imgae = \"x\"\n").unwrap();
        let o = ServeOptions {
            config: Some(path),
            ..Default::default()
        };
        assert!(o.merged().unwrap_err().to_string().contains("imgae"));
    }
}
