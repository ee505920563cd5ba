//! vmcrypt-bench: vmcrypt against qemu-storage-daemon (QSD), side by side,
//! over vhost-user-blk with libblkio as the frontend (no VM in the way).
//!
//! Both servers of a pair run at once and each cell is measured on them in
//! alternation (A B A B ...), so drift on a shared machine hits both alike;
//! the report gives ratios from the same run.

mod chart;
mod driver;
mod server;
mod xts;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use driver::{Measured, Workload};
use server::{Kind, Server, ServerSpec, Target};

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark vmcrypt against qemu-storage-daemon over vhost-user-blk"
)]
struct Args {
    /// A smoke run: tiny image, short cells, one round (checks the tool, not the speed).
    #[arg(long)]
    quick: bool,
    /// Seconds measured per cell and server, per round.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of A/B alternation per cell.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Image size for the raw (and encrypted) targets, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Only run cells whose name contains this (e.g. "randread4k-qd32").
    #[arg(long)]
    only: Option<String>,
    /// Queue counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queues: Vec<u32>,
    /// Targets: null, raw, luks (encrypted), and on Ceph RBD rbd and
    /// rbd-luks (a single-node memstore cluster that ci/ceph.sh starts for
    /// the run: it measures the client path, not a real cluster; images of
    /// at most 256 MiB).
    #[arg(long, value_delimiter = ',', default_value = "null,raw,luks")]
    targets: Vec<String>,
    /// Skip the XTS engine benchmark.
    #[arg(long)]
    no_xts: bool,
    /// The client busy-polls for completions (libblkio poll queues) instead of
    /// sleeping until notified: shows the servers' capacity rather than the
    /// cost of waking the client.
    #[arg(long)]
    client_poll: bool,
    /// Host page cache for the raw and encrypted images, both servers:
    /// `writeback`, or `none` (O_DIRECT: vmcrypt `--cache none`, QSD
    /// `cache.direct=on,aio=io_uring`).
    #[arg(long, default_value = "writeback", value_parser = ["writeback", "none"])]
    cache: String,
    /// Ask each vmcrypt for `query-stats` on its control socket every this
    /// many milliseconds while it is measured, as monitoring would (the
    /// figure in docs/benchmarks.md uses 100).
    #[arg(long, value_name = "MS")]
    poll_stats_ms: Option<u64>,
    /// The vmcrypt binary [default: the one built beside this benchmark].
    #[arg(long)]
    vmcrypt: Option<PathBuf>,
    #[arg(skip)]
    vmcrypt_bin: PathBuf,
    /// Folder for bench.md and bench.json, and for the images.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "randread4k-qd1",
        write: false,
        random: true,
        block: 4096,
        depth: 1,
    },
    Workload {
        name: "randread4k-qd32",
        write: false,
        random: true,
        block: 4096,
        depth: 32,
    },
    Workload {
        name: "randwrite4k-qd32",
        write: true,
        random: true,
        block: 4096,
        depth: 32,
    },
    Workload {
        name: "seqread128k-qd8",
        write: false,
        random: false,
        block: 128 << 10,
        depth: 8,
    },
    Workload {
        name: "seqwrite128k-qd8",
        write: true,
        random: false,
        block: 128 << 10,
        depth: 8,
    },
];

#[derive(serde::Serialize)]
struct Cell {
    target: String,
    workload: Workload,
    queues: u32,
    server: String,
    rounds: Vec<Measured>,
    iops: f64,
    mb_s: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_io: f64,
}

/// The cells of large transfers (64 KiB or more) in GB/s, with the server
/// CPU each GB moved cost: what bounds a stream of them.
fn large_transfers_md(cells: &[Cell]) -> String {
    let large: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.workload.block >= 64 << 10)
        .collect();
    if large.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n| large transfers | queues | server | GB/s | server CPU ms per GB |\n|---|---|---|---:|---:|\n",
    );
    for c in large {
        let gb_s = c.iops * c.workload.block as f64 / 1e9;
        let ms_per_gb = c.cpu_us_per_io / 1e3 * (1e9 / c.workload.block as f64);
        md.push_str(&format!(
            "| {} {} | {} | {} | {:.2} | {:.0} |\n",
            c.target, c.workload.name, c.queues, c.server, gb_s, ms_per_gb
        ));
    }
    md
}

/// Writes back dirty pages left by earlier write runs, so the kernel's
/// writeback does not compete with the next measurement for the CPUs.
fn settle() {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
}

fn vmcrypt_binary(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(|| {
        let me = std::env::current_exe().expect("current exe");
        me.parent().unwrap().join("vmcrypt")
    })
}

/// A preallocated image with non-zero data, read once so it is in the page cache.
fn make_image(path: &Path, size: u64) -> std::io::Result<()> {
    let ok = std::fs::metadata(path)
        .map(|m| m.len() == size)
        .unwrap_or(false);
    if !ok {
        let mut f = std::fs::File::create(path)?;
        let chunk = vec![0xa5u8; 1 << 20];
        for _ in 0..size >> 20 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    let _ = std::fs::read(path)?;
    Ok(())
}

/// An encrypted image made by `vmcrypt create`, its payload filled (so no
/// holes), in the page cache, and its exported passphrase for QSD.
fn make_luks_image(vmcrypt: &Path, dir: &Path, size: u64) -> std::io::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::FileExt;
    let img = dir.join("luks.img");
    let pass = dir.join("luks.pass");
    let keys = dir.join("keys");
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(dir.join("luks.img.vmcrypt"));
    let _ = std::fs::remove_file(&pass);
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(vmcrypt).args(args).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(())
    };
    run(&[
        "create".as_ref(),
        img.as_os_str(),
        "--size".as_ref(),
        size.to_string().as_ref(),
        "--keystore".as_ref(),
        keys.as_os_str(),
    ])?;
    run(&[
        "export-passphrase".as_ref(),
        img.as_os_str(),
        "--output".as_ref(),
        pass.as_os_str(),
    ])?;
    let f = std::fs::OpenOptions::new().write(true).open(&img)?;
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..size >> 20 {
        f.write_all_at(&chunk, (2 << 20) + (i << 20))?;
    }
    f.sync_all()?;
    let _ = std::fs::read(&img)?;
    Ok((img, pass))
}

/// The Ceph cluster the rbd targets use, stopped when dropped.
struct Ceph {
    dir: PathBuf,
    conf: PathBuf,
}

fn ceph_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/ceph.sh")
}

impl Ceph {
    fn start(dir: &Path) -> Ceph {
        let dir = dir.join("ceph");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let out = std::process::Command::new("bash")
            .arg(ceph_script())
            .arg("start")
            .arg(&dir)
            .env("CEPH_PORT", port.to_string())
            .output()
            .expect("ci/ceph.sh");
        assert!(
            out.status.success(),
            "ci/ceph.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ceph {
            conf: dir.join("ceph.conf"),
            dir,
        }
    }

    /// Imports `file` as `rbd/NAME`.
    fn import(&self, file: &Path, name: &str) {
        let out = std::process::Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .arg("import")
            .arg(file)
            .arg(format!("rbd/{name}"))
            .output()
            .expect("rbd import");
        assert!(
            out.status.success(),
            "rbd import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(ceph_script())
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

fn pairs(args: &Args, dir: &Path, ceph: Option<&Ceph>) -> Vec<(String, ServerSpec, ServerSpec)> {
    let size = args.size_mib << 20;
    let mut v = Vec::new();
    for t in &args.targets {
        let (target_a, target_b) = match t.as_str() {
            // One image per server: both run at once, and the one whose
            // device runs holds an RBD image's exclusive lock.
            "rbd" | "rbd-luks" => {
                let ceph = ceph.expect("a cluster for the rbd targets");
                let (file, passphrase) = if t == "rbd" {
                    let img = dir.join("raw.img");
                    make_image(&img, size).expect("raw image");
                    (img, None)
                } else {
                    let (img, pass) =
                        make_luks_image(&args.vmcrypt_bin, dir, size).expect("LUKS image");
                    (img, Some(pass))
                };
                let target = |side: &str| {
                    let name = format!("bench-{t}-{side}");
                    ceph.import(&file, &name);
                    Target::Rbd {
                        conf: ceph.conf.clone(),
                        name,
                        passphrase: passphrase.clone(),
                    }
                };
                (target("a"), target("b"))
            }
            "null" => (Target::Null { size }, Target::Null { size }),
            "raw" => {
                let img = dir.join("raw.img");
                make_image(&img, size).expect("raw image");
                (
                    Target::Raw { image: img.clone() },
                    Target::Raw { image: img },
                )
            }
            "luks" => {
                let (img, pass) =
                    make_luks_image(&args.vmcrypt_bin, dir, size).expect("LUKS image");
                let t = Target::Luks {
                    image: img,
                    passphrase: pass,
                };
                (t.clone(), t)
            }
            other => panic!("unknown target {other}"),
        };
        let (la, lb) = match t.as_str() {
            "null" => ("vmcrypt null", "QSD null-co"),
            "luks" => ("vmcrypt encrypted", "QSD luks"),
            "rbd" => ("vmcrypt rbd", "QSD rbd"),
            "rbd-luks" => ("vmcrypt rbd encrypted", "QSD rbd+luks"),
            _ => ("vmcrypt raw", "QSD raw"),
        };
        v.push((
            t.clone(),
            ServerSpec {
                kind: Kind::Vmcrypt,
                target: target_a,
                label: la.into(),
            },
            ServerSpec {
                kind: Kind::Qsd,
                target: target_b,
                label: lb.into(),
            },
        ));
    }
    v
}

fn summarize(
    target: &str,
    w: Workload,
    queues: u32,
    label: &str,
    rounds: Vec<Measured>,
    cpu: f64,
) -> Cell {
    let n = rounds.len() as f64;
    let ios: u64 = rounds.iter().map(|m| m.all_ios).sum();
    Cell {
        target: target.into(),
        workload: w,
        queues,
        server: label.into(),
        iops: rounds.iter().map(|m| m.iops).sum::<f64>() / n,
        mb_s: rounds.iter().map(|m| m.mb_s).sum::<f64>() / n,
        mean_us: rounds.iter().map(|m| m.mean_us).sum::<f64>() / n,
        p50_us: rounds.iter().map(|m| m.p50_us).sum::<f64>() / n,
        p99_us: rounds.iter().map(|m| m.p99_us).sum::<f64>() / n,
        cpu_us_per_io: if ios > 0 { cpu * 1e6 / ios as f64 } else { 0.0 },
        rounds,
    }
}

/// The goal an issue sets for a ratio, if any.
fn goal_for(name: &str) -> Option<f64> {
    if name.starts_with("vmcrypt null / QSD null-co: randread4k-qd32 q1") {
        Some(1.5)
    } else if name.starts_with("vmcrypt raw / QSD raw: randread4k-qd32 q1") {
        Some(1.0)
    } else if name.starts_with("vmcrypt encrypted / QSD luks: randread4k-qd32 q1") {
        Some(2.0)
    } else if name.starts_with("vmcrypt encrypted / vmcrypt raw:") {
        Some(if name.contains("128k") { 0.8 } else { 0.9 })
    } else if name.starts_with("vmcrypt rbd / QSD rbd: rand") && name.contains("4k-qd32 q1") {
        Some(1.0)
    } else if name.starts_with("vmcrypt rbd encrypted / QSD rbd+luks:") && !name.contains("qd1 ") {
        Some(2.0)
    } else if name.starts_with("vmcrypt rbd encrypted / vmcrypt rbd:") && !name.contains("qd1 ") {
        Some(0.9)
    } else if name.starts_with("XTS: vmcrypt encrypt (4 KiB requests)") {
        Some(1.5)
    } else if name.starts_with("XTS: vmcrypt encrypt (512-byte") {
        Some(1.3)
    } else {
        None
    }
}

fn main() {
    let mut args = Args::parse();
    if let Some(ms) = args.poll_stats_ms {
        let _ = server::POLL_STATS_MS.set(ms);
    }
    if args.quick {
        args.seconds = 0.3;
        args.rounds = 1;
        args.size_mib = 64;
    }
    std::fs::create_dir_all(&args.out).expect("create output folder");
    let dir = std::fs::canonicalize(&args.out).unwrap();
    let vmcrypt = vmcrypt_binary(args.vmcrypt.clone());
    args.vmcrypt_bin = vmcrypt.clone();
    if !vmcrypt.exists() {
        eprintln!(
            "vmcrypt binary not found at {} (build it with cargo build --release -p vmcrypt)",
            vmcrypt.display()
        );
        std::process::exit(2);
    }
    let dur = Duration::from_secs_f64(args.seconds);
    let uses_rbd = args.targets.iter().any(|t| t.starts_with("rbd"));
    if uses_rbd && args.size_mib > 256 {
        eprintln!("rbd targets: images of 256 MiB (the memstore OSD keeps them in memory)");
        args.size_mib = 256;
    }
    let span = args.size_mib << 20;
    let ceph = uses_rbd.then(|| Ceph::start(&dir));
    let pairs = pairs(&args, &dir, ceph.as_ref());
    // The workloads `--only` selects, in table order.
    let workloads: Vec<Workload> = WORKLOADS
        .into_iter()
        .filter(|w| {
            args.only
                .as_ref()
                .is_none_or(|o| w.name.contains(o.as_str()))
        })
        .collect();
    let cells_total: usize = pairs.len() * workloads.len() * args.queues.len();
    let mut cells: Vec<Cell> = Vec::new();
    let mut ratios: Vec<(String, f64)> = Vec::new();
    // Every target's two servers run for the whole benchmark, and each
    // round measures every target in turn: a ratio between targets (an
    // encrypted disk against a raw one) then compares measurements taken
    // side by side, not minutes apart. Run in target order, a memstore OSD
    // that slowed as the run went on made the second target's 4 KiB
    // writes look 15-35% slower; in the other order, faster. The order of
    // targets within a round alternates too (below).
    let max_q = *args.queues.iter().max().unwrap_or(&1);
    let direct = args.cache == "none";
    let servers: Vec<(Server, Server)> = pairs
        .iter()
        .map(|(_, a, b)| {
            let sa =
                Server::start(a, &vmcrypt, &dir, max_q, direct).unwrap_or_else(|e| panic!("{e}"));
            let sb =
                Server::start(b, &vmcrypt, &dir, max_q, direct).unwrap_or_else(|e| panic!("{e}"));
            (sa, sb)
        })
        .collect();
    // Every server runs the first cell briefly, unmeasured, before round
    // one, and on RBD 4 KiB random writes too: on a fresh cluster the first
    // write measurement of a run came out 20-40% faster than every later
    // one (25.8-28.4k IOPS against 18.5-20.4k), whichever target it was.
    let randwrite = WORKLOADS.iter().find(|w| w.write && w.random);
    for ((_, a, b), (sa, sb)) in pairs.iter().zip(&servers) {
        let rbd = matches!(a.target, Target::Rbd { .. });
        let warm_with = workloads
            .first()
            .into_iter()
            .chain(randwrite.filter(|_| rbd))
            .collect::<Vec<_>>();
        for (spec, s) in [(a, sa), (b, sb)] {
            for w in &warm_with {
                eprint!("\rwarming up {}   ", spec.label);
                let _ = std::io::stderr().flush();
                let warm = dur.min(Duration::from_secs(if w.write { 2 } else { 1 }));
                driver::run(&s.socket, **w, 1, warm, span, args.client_poll)
                    .unwrap_or_else(|e| panic!("warming up: {}: {e}", w.name));
            }
        }
    }
    let mut done = 0;
    for w in &workloads {
        for &q in &args.queues {
            // Per target: rounds and CPU seconds of server A and B.
            type Acc = (Vec<Measured>, Vec<Measured>, f64, f64);
            let mut acc: Vec<Acc> = pairs.iter().map(|_| Default::default()).collect();
            for round in 0..args.rounds {
                // Odd rounds take the targets in reverse order, so that a
                // cluster or page cache that drifts during a round favours
                // no target: each has the early place in half the rounds.
                let mut turn: Vec<usize> = (0..pairs.len()).collect();
                if round % 2 == 1 {
                    turn.reverse();
                }
                for (n, i) in turn.into_iter().enumerate() {
                    let ((target, _, _), (sa, sb)) = (&pairs[i], &servers[i]);
                    eprint!(
                        "\r[{}/{cells_total}] {target} {} q{q} round {}/{}   ",
                        done + n + 1,
                        w.name,
                        round + 1,
                        args.rounds
                    );
                    let _ = std::io::stderr().flush();
                    let (ra, rb, cpu_a, cpu_b) = &mut acc[i];
                    // Alternate which server goes first each round.
                    let order: [(&Server, &mut Vec<Measured>, &mut f64); 2] = if round % 2 == 0 {
                        [(sa, ra, cpu_a), (sb, rb, cpu_b)]
                    } else {
                        [(sb, rb, cpu_b), (sa, ra, cpu_a)]
                    };
                    for (s, results, cpu) in order {
                        settle();
                        let c0 = s.cpu_seconds();
                        let m = driver::run(&s.socket, *w, q as usize, dur, span, args.client_poll)
                            .unwrap_or_else(|e| panic!("{}: {e}", w.name));
                        *cpu += s.cpu_seconds() - c0;
                        results.push(m);
                    }
                }
            }
            done += pairs.len();
            for ((target, a, b), (ra, rb, cpu_a, cpu_b)) in pairs.iter().zip(acc) {
                let ca = summarize(target, *w, q, &a.label, ra, cpu_a);
                let cb = summarize(target, *w, q, &b.label, rb, cpu_b);
                ratios.push((
                    format!("{} / {}: {} q{q}", a.label, b.label, w.name),
                    ca.iops / cb.iops,
                ));
                cells.push(ca);
                cells.push(cb);
            }
        }
    }
    for (sa, sb) in servers {
        sa.stop();
        sb.stop();
    }
    // The tables list the cells target by target, as before.
    let target_rank = |t: &str| pairs.iter().position(|(p, _, _)| p == t);
    cells.sort_by_key(|c| target_rank(&c.target));
    ratios.sort_by_key(|(name, _)| {
        pairs
            .iter()
            .position(|(_, a, _)| name.starts_with(&format!("{} / ", a.label)))
    });
    eprintln!();
    // Encrypted against unencrypted vmcrypt, cell by cell, on files and
    // on RBD.
    for (enc, raw) in [
        ("vmcrypt encrypted", "vmcrypt raw"),
        ("vmcrypt rbd encrypted", "vmcrypt rbd"),
    ] {
        for c in cells.iter().filter(|c| c.server == enc) {
            if let Some(r) = cells.iter().find(|r| {
                r.server == raw && r.workload.name == c.workload.name && r.queues == c.queues
            }) {
                ratios.push((
                    format!("{enc} / {raw}: {} q{}", c.workload.name, c.queues),
                    c.iops / r.iops,
                ));
            }
        }
    }
    let xts_report = if args.no_xts {
        None
    } else {
        Some(xts::run(args.quick))
    };

    let mut md = String::new();
    md.push_str(&format!("cache: {}\n\n", args.cache));
    md.push_str("| target | workload | queues | server | IOPS | MB/s | mean µs | p50 µs | p99 µs | server CPU µs/IO |\n");
    md.push_str("|---|---|---|---|---:|---:|---:|---:|---:|---:|\n");
    for c in &cells {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            c.target,
            c.workload.name,
            c.queues,
            c.server,
            c.iops,
            c.mb_s,
            c.mean_us,
            c.p50_us,
            c.p99_us,
            c.cpu_us_per_io
        ));
    }
    md.push_str(&large_transfers_md(&cells));
    // Queue depth 1 latency: encrypted vmcrypt against unencrypted QSD.
    for q in &args.queues {
        let find = |server: &str| {
            cells.iter().find(|c| {
                c.server == server && c.workload.name == "randread4k-qd1" && c.queues == *q
            })
        };
        if let (Some(e), Some(r)) = (find("vmcrypt encrypted"), find("QSD raw")) {
            md.push_str(&format!(
                "\nQD1 4k random read p50, q{q}: vmcrypt encrypted {:.1} µs, QSD raw {:.1} µs ({:+.1} µs; goal: at most +5 µs)\n",
                e.p50_us,
                r.p50_us,
                e.p50_us - r.p50_us
            ));
        }
    }
    md.push_str("\n| ratio (IOPS) | value |\n|---|---:|\n");
    for (name, r) in &ratios {
        md.push_str(&format!("| {name} | {r:.2}x |\n"));
    }
    if let Some(x) = &xts_report {
        md.push_str(&x.markdown());
    }
    print!("{md}");
    std::fs::write(dir.join("bench.md"), &md).expect("write bench.md");
    let mut chart_rows: Vec<(String, f64, Option<f64>)> = ratios
        .iter()
        .map(|(n, r)| (n.clone(), *r, goal_for(n)))
        .collect();
    if let Some(x) = &xts_report {
        chart_rows.extend(
            x.ratios
                .iter()
                .map(|(n, r)| (format!("XTS: {n}"), *r, goal_for(&format!("XTS: {n}")))),
        );
    }
    std::fs::write(
        dir.join("bench.svg"),
        chart::ratios_svg("vmcrypt against its peers", &chart_rows),
    )
    .expect("write bench.svg");
    let json = serde_json::json!({ "cells": cells, "ratios": ratios, "xts": xts_report });
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write bench.json");
    eprintln!("results in {}", dir.display());
}
