//! The `vmcrypt` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmcrypt::config::{ServeConfig, ServeOptions};

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
    Serve(ServeOptions),
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
            let opts = match opts.merged() {
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
    }
}
