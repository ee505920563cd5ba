//! The `vmcrypt` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmcrypt::commands;
use vmcrypt::config::{ServeConfig, ServeOptions};
use vmcrypt::keys::KeySource;

fn key_source(keystore: Option<PathBuf>, kms: Option<PathBuf>, deadline: u64) -> KeySource {
    KeySource {
        passphrase_file: None,
        keystore,
        kms,
        kms_deadline: std::time::Duration::from_secs(deadline),
        max_iterations: vmcrypt_crypto::luks::DEFAULT_MAX_ITERATIONS,
    }
}

/// The provider new KEKs are made at, and the key store folder to record
/// for a local one.
fn new_provider(
    source: &KeySource,
) -> Result<(Box<dyn vmcrypt_kms::KeyProvider>, Option<PathBuf>), commands::CommandError> {
    let provider = source.new_key_provider()?;
    let dir = match source.kms {
        Some(_) => None,
        None => {
            let d = source
                .keystore
                .clone()
                .unwrap_or_else(vmcrypt_kms::LocalKeyStore::default_dir);
            Some(std::path::absolute(&d).unwrap_or(d))
        }
    };
    Ok((provider, dir))
}

fn done(r: Result<(), commands::CommandError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// vmcrypt: a vhost-user-blk backend that serves disk images to QEMU/KVM
/// guests through a pipeline of filters.
#[derive(Parser)]
#[command(name = "vmcrypt", version, propagate_version = true)]
#[command(after_help = "Attach a served disk to QEMU with:\n  \
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem\n  \
    -chardev socket,id=c0,path=SOCK -device vhost-user-blk-pci,chardev=c0,num-queues=N")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a disk image on a vhost-user-blk socket until SIGINT or SIGTERM.
    ///
    /// The daemon keeps listening across frontend disconnects (guest shutdown,
    /// QEMU restart). SIGTERM or SIGINT completes the requests in flight,
    /// flushes the image and exits 0; SIGUSR1 logs the filters' statistics.
    Serve(Box<ServeOptions>),

    /// Create an encrypted disk image (LUKS1, aes-xts-plain64, payload at 2 MiB).
    ///
    /// A fresh key-encryption key (KEK) is made at the key provider (the
    /// local key store unless --kms is given); the image's random data key
    /// is stored only in a LUKS key slot that the KEK opens. The KEK's id is
    /// recorded in IMAGE.vmcrypt (no secrets) where `serve` finds it.
    Create {
        /// The image file to create (must not exist), or `rbd:POOL/IMAGE`
        /// for an RBD image (its key descriptor goes into its metadata).
        image: PathBuf,
        /// Size of the disk the guest sees (K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        /// Local key store folder [default: $XDG_DATA_HOME/vmcrypt/keys].
        /// Meant for a single host or development.
        #[arg(long, value_name = "DIR", conflicts_with = "kms")]
        keystore: Option<PathBuf>,
        /// Make the KEK at these KMIP servers (KMS configuration file).
        #[arg(long, value_name = "FILE")]
        kms: Option<PathBuf>,
        /// Seconds to keep retrying unreachable KMS servers.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        kms_deadline: u64,
        #[command(flatten)]
        ceph: CephArgs,
    },

    /// Shallow rekey: a new KEK and key slot for the same data key.
    ///
    /// The old key slot is wiped; with --revoke-old the old KEK is revoked at
    /// its provider. The new KEK is made at --kms if given, else in the local
    /// key store. Safe while a file image is served; an rbd: image must not
    /// be served meanwhile (its daemon holds librbd's exclusive lock).
    Rekey {
        image: PathBuf,
        /// KMS configuration: where the old KEK is (if the image's key is at a
        /// KMS) and where the new one is made.
        #[arg(long, value_name = "FILE")]
        kms: Option<PathBuf>,
        /// Local key store folder (for a local old or new KEK).
        #[arg(long, value_name = "DIR")]
        keystore: Option<PathBuf>,
        /// Revoke the old KEK once the image no longer uses it. Snapshots and
        /// shallow clones taken before still open only with the old KEK:
        /// after this they can no longer be served.
        #[arg(long)]
        revoke_old: bool,
        /// Seconds to keep retrying unreachable KMS servers.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        kms_deadline: u64,
        #[command(flatten)]
        ceph: CephArgs,
    },

    /// Copy an image that is not being served: under a new KEK, and with
    /// --deep under a new data key too.
    ///
    /// Without --deep, DST keeps SRC's data key but opens only with a new
    /// KEK (made at --kms if given, else in the local key store): its only
    /// key slot is new and it has its own LUKS UUID. The data is shared with
    /// a reflink where the file system has them (XFS, btrfs), else copied.
    /// Sharing the data key means: equal plaintext blocks at equal offsets
    /// show as equal ciphertext in SRC and DST, and one leaked data key
    /// opens both (and every snapshot of SRC).
    ///
    /// With --deep, DST also gets a new data key: the data is decrypted and
    /// encrypted again while it is copied. This is the deep rekey of a VM's
    /// disk: snapshot it (`ctl ... snapshot`), clone the snapshot with
    /// --deep, and serve the clone.
    ///
    /// DST appears only when complete (it is built as DST.partial).
    ///
    /// Image files only. For an RBD image: `rbd clone` of a protected
    /// snapshot (RBD copies the key descriptor with it), then `vmcrypt rekey`
    /// of the clone.
    Clone {
        /// The image to copy (not served by a running device: use a snapshot).
        src: PathBuf,
        /// The new image (must not exist).
        dst: PathBuf,
        /// Make a new data key and re-encrypt.
        #[arg(long)]
        deep: bool,
        /// KMS configuration: where SRC's KEK is (if at a KMS) and where the
        /// new one is made.
        #[arg(long, value_name = "FILE", conflicts_with = "keystore")]
        kms: Option<PathBuf>,
        /// Local key store folder (for a local old or new KEK).
        #[arg(long, value_name = "DIR")]
        keystore: Option<PathBuf>,
        /// A passphrase file that opens SRC (instead of its key descriptor).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Seconds to keep retrying unreachable KMS servers.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        kms_deadline: u64,
    },

    /// Ask a running `serve --control PATH` something, or change a setting.
    ///
    /// Methods: status, query-stats, metrics (Prometheus text),
    /// set-throttle (e.g. `total_iops_sec=1000 write_bytes_sec=50M`; 0
    /// removes a limit), resize (`size=20G`; grows only, the guest is told),
    /// snapshot (`path=/abs/new.img`; a reflink copy, XFS or btrfs; on an
    /// RBD image `name=SNAP`, an RBD snapshot).
    /// Parameters are key=value; sizes take K/M/G/T.
    Ctl {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the raw JSON result instead of readable text.
        #[arg(long)]
        json: bool,
        /// status, query-stats, metrics, set-throttle, resize or snapshot.
        method: String,
        /// key=value parameters.
        params: Vec<String>,
    },

    /// A live view of a served disk (`serve --control PATH`): per queue,
    /// read and write IOPS, MB/s, requests in flight and latency p50/p99
    /// over the last interval. Ctrl-C ends it.
    Top {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (for scripts) [default: run until interrupted].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },

    /// KMS tools.
    #[command(subcommand)]
    Kms(KmsCommand),

    /// Print a shell completion script (bash, zsh, fish, elvish or
    /// powershell) on stdout, e.g.
    /// `vmcrypt completions bash > /etc/bash_completion.d/vmcrypt`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },

    /// Write the man pages (vmcrypt.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Manpages {
        /// The folder to write them into.
        dir: PathBuf,
    },

    /// Show what an image is (format, cipher, UUID, capacity, key slots, key id); never a secret.
    Info {
        /// An image file, or rbd:POOL/IMAGE.
        image: PathBuf,
        #[command(flatten)]
        ceph: CephArgs,
    },

    /// Recovery: write the key-slot passphrase of an encrypted image to a new file (mode 0600).
    ///
    /// With it, the image opens without vmcrypt:
    /// `cryptsetup open --test-passphrase --key-file FILE IMAGE`, or
    /// `qemu-io --object secret,id=s0,file=FILE --image-opts driver=luks,key-secret=s0,file.filename=IMAGE`.
    ExportPassphrase {
        image: PathBuf,
        /// The file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        /// Local key store folder [default: the one in the key descriptor].
        #[arg(long, value_name = "DIR")]
        keystore: Option<PathBuf>,
        /// KMS configuration, if the image's key is at a KMIP server.
        #[arg(long, value_name = "FILE")]
        kms: Option<PathBuf>,
        #[command(flatten)]
        ceph: CephArgs,
    },
}

/// How to reach the Ceph cluster of an `rbd:` image.
#[derive(clap::Args)]
struct CephArgs {
    /// For an rbd: image, the Ceph configuration.
    #[arg(long, value_name = "FILE", default_value = "/etc/ceph/ceph.conf")]
    ceph_conf: PathBuf,
    /// For an rbd: image, the cephx user without "client." [default: admin].
    #[arg(long, value_name = "NAME")]
    ceph_id: Option<String>,
    /// For an rbd: image, seconds to keep trying to reach the monitors.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    ceph_deadline: u64,
}

impl CephArgs {
    fn options(self) -> vmcrypt::rbd::CephOptions {
        vmcrypt::rbd::CephOptions {
            conf: self.ceph_conf,
            id: self.ceph_id,
            deadline: std::time::Duration::from_secs(self.ceph_deadline),
        }
    }
}

/// `rbd:POOL/IMAGE` in an image argument, parsed.
fn rbd_spec(image: &std::path::Path) -> Option<Result<vmcrypt::rbd::RbdSpec, String>> {
    image
        .to_str()
        .and_then(|s| s.strip_prefix("rbd:"))
        .map(vmcrypt::rbd::RbdSpec::parse)
}

#[derive(Subcommand)]
enum KmsCommand {
    /// Connect to each configured KMS server and show its protocol versions
    /// and whether it accepts our client certificate: the first thing to run
    /// when keys do not come.
    Check {
        #[arg(long, value_name = "FILE")]
        kms: PathBuf,
    },
}

fn ctl(control: &std::path::Path, json: bool, method: &str, params: &[String]) -> ExitCode {
    use vmcrypt::control::client::{self, Client};
    let result = client::params(params)
        .and_then(|p| Client::connect(control).and_then(|mut c| c.call(method, p)));
    match result {
        Ok(v) if json => {
            println!("{v:#}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            print!("{}", client::readable(method, &v));
            ExitCode::SUCCESS
        }
        Err(e) => report(&e),
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    vmcrypt::config::parse_size(s)
}

fn init_logging(level: Option<&str>) {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Prints an error with its chain of causes on one line.
fn report(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    eprintln!("vmcrypt: error: {msg}");
    ExitCode::FAILURE
}

/// Keeps key material out of core dumps: a crash must not write the data
/// key or a KEK to disk. (This also stops other users' ptrace.)
fn no_core_dumps() {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) changes only this process's flag.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        eprintln!(
            "vmcrypt: warning: cannot disable core dumps: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `--version`: the release, the commit it was built from, and the XTS
/// engine this CPU gets.
fn version() -> String {
    format!(
        "{} (commit {}; XTS engine on this CPU: {})",
        env!("CARGO_PKG_VERSION"),
        env!("VMCRYPT_GIT_COMMIT"),
        vmcrypt_crypto::xts::engine_for_this_cpu()
    )
}

/// The command line as clap sees it, for parsing, man pages and completions.
fn command_line() -> clap::Command {
    Cli::command().version(version())
}

/// Writes `vmcrypt.1` and one page per (visible) subcommand into `dir`.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // The release alone: the pages must not depend on the build machine.
    let cmd = Cli::command().version(env!("CARGO_PKG_VERSION"));
    let date = "2026-12";
    let write = |name: String, cmd: clap::Command| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .title(name.to_uppercase())
            .section("1")
            .date(date)
            .source(format!("vmcrypt {}", env!("CARGO_PKG_VERSION")))
            .manual("vmcrypt manual")
            .render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)
    };
    write("vmcrypt".into(), cmd.clone())?;
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("vmcrypt-{}", sub.get_name());
        let sub = sub.clone().name(name.clone());
        write(name.clone(), sub.clone())?;
        for subsub in sub.get_subcommands().filter(|c| !c.is_hide_set()) {
            let n = format!("{name}-{}", subsub.get_name());
            write(n.clone(), subsub.clone().name(n))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    no_core_dumps();
    let cli = match Cli::from_arg_matches(&command_line().get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command_line(), "vmcrypt", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmcrypt: error: writing the completion script: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Manpages { dir } => match write_man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "vmcrypt: error: writing man pages into {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Serve(opts) => {
            let opts = match (*opts).merged() {
                Ok(o) => o,
                Err(e) => return report(&e),
            };
            init_logging(opts.log_level.as_deref());
            let cfg = match ServeConfig::try_from(opts) {
                Ok(c) => c,
                Err(e) => return report(&e),
            };
            match vmcrypt::server::serve(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(&e),
            }
        }
        Command::Ctl {
            control,
            json,
            method,
            params,
        } => ctl(&control, json, &method, &params),
        Command::Create {
            image,
            size,
            keystore,
            kms,
            kms_deadline,
            ceph,
        } => {
            init_logging(Some("warn"));
            let source = key_source(keystore, kms, kms_deadline);
            done(
                new_provider(&source).and_then(|(p, dir)| match rbd_spec(&image) {
                    Some(spec) => commands::create_rbd(
                        &spec.map_err(commands::CommandError::Invalid)?,
                        &ceph.options(),
                        size,
                        p.as_ref(),
                        dir,
                    ),
                    None => commands::create(&image, size, p.as_ref(), dir),
                }),
            )
        }
        Command::Rekey {
            image,
            kms,
            keystore,
            revoke_old,
            kms_deadline,
            ceph,
        } => {
            init_logging(Some("warn"));
            let source = key_source(keystore, kms, kms_deadline);
            done(
                new_provider(&source).and_then(|(p, dir)| match rbd_spec(&image) {
                    Some(spec) => commands::rekey_rbd(
                        &spec.map_err(commands::CommandError::Invalid)?,
                        &ceph.options(),
                        &source,
                        p.as_ref(),
                        dir,
                        revoke_old,
                    ),
                    None => commands::rekey(&image, &source, p.as_ref(), dir, revoke_old),
                }),
            )
        }
        Command::Top {
            control,
            interval,
            count,
        } => {
            if !(interval.is_finite() && interval >= 0.1) {
                eprintln!("vmcrypt: error: --interval {interval}: at least 0.1 s");
                return ExitCode::FAILURE;
            }
            let every = std::time::Duration::from_secs_f64(interval);
            match vmcrypt::control::top::run(&control, every, count) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(&e),
            }
        }
        Command::Clone {
            src,
            dst,
            deep,
            kms,
            keystore,
            passphrase_file,
            kms_deadline,
        } => {
            init_logging(Some("warn"));
            if let Some(rbd) = [&src, &dst].into_iter().find(|p| rbd_spec(p).is_some()) {
                return done(Err(commands::CommandError::Invalid(format!(
                    "{}: clone works on image files only, not yet on RBD images (for now: \
                     `rbd clone` of a protected snapshot gives a shallow copy with the same \
                     key; `vmcrypt rekey` then gives it a key-encryption key of its own)",
                    rbd.display()
                ))));
            }
            let mut source = key_source(keystore, kms, kms_deadline);
            source.passphrase_file = passphrase_file;
            done(new_provider(&source).and_then(|(p, dir)| {
                vmcrypt::clone::clone(&vmcrypt::clone::CloneRequest {
                    src: &src,
                    dst: &dst,
                    old: &source,
                    new_provider: p.as_ref(),
                    keystore: dir,
                    deep,
                })
            }))
        }
        Command::Kms(KmsCommand::Check { kms }) => {
            init_logging(Some("warn"));
            done(commands::kms_check(&kms))
        }
        Command::Info { image, ceph } => done(match rbd_spec(&image) {
            Some(Ok(spec)) => commands::info_rbd(&spec, &ceph.options()),
            Some(Err(e)) => Err(commands::CommandError::Invalid(e)),
            None => commands::info(&image),
        }),
        Command::ExportPassphrase {
            image,
            output,
            keystore,
            kms,
            ceph,
        } => {
            init_logging(Some("warn"));
            let source = key_source(keystore, kms, 30);
            done(match rbd_spec(&image) {
                Some(Ok(spec)) => {
                    commands::export_passphrase_rbd(&spec, &ceph.options(), &output, &source)
                }
                Some(Err(e)) => Err(commands::CommandError::Invalid(e)),
                None => commands::export_passphrase(&image, &output, &source),
            })
        }
    }
}
