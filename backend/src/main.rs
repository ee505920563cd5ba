//! The `vmcrypt` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmcrypt::commands;
use vmcrypt::config::{ServeConfig, ServeOptions};
use vmcrypt::keys::KeySource;

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
        /// The image file to create (must not exist).
        image: PathBuf,
        /// Size of the disk the guest sees (K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        /// Local key store folder [default: $XDG_DATA_HOME/vmcrypt/keys].
        /// Meant for a single host or development.
        #[arg(long, value_name = "DIR")]
        keystore: Option<PathBuf>,
    },

    /// Show what an image is (format, cipher, UUID, capacity, key slots, key id); never a secret.
    Info { image: PathBuf },

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
    },
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
        Command::Create {
            image,
            size,
            keystore,
        } => {
            init_logging(Some("warn"));
            let store = commands::local_store(keystore.as_deref());
            let dir = Some(std::path::absolute(store.dir()).unwrap_or_else(|_| store.dir().into()));
            done(commands::create(&image, size, &store, dir))
        }
        Command::Info { image } => done(commands::info(&image)),
        Command::ExportPassphrase {
            image,
            output,
            keystore,
        } => {
            init_logging(Some("warn"));
            let source = KeySource {
                passphrase_file: None,
                keystore,
            };
            done(commands::export_passphrase(&image, &output, &source))
        }
    }
}
