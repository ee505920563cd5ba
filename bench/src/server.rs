//! The servers compared: vmcrypt and qemu-storage-daemon (QSD), started and
//! stopped by the benchmark itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What a server serves.
#[derive(Clone, Debug)]
pub enum Target {
    Null {
        size: u64,
    },
    Raw {
        image: PathBuf,
    },
    /// A LUKS image opened with the passphrase in a file.
    Luks {
        image: PathBuf,
        passphrase: PathBuf,
    },
    /// An RBD image `rbd/NAME` of the cluster `conf` describes; with a
    /// passphrase, a LUKS image inside it.
    Rbd {
        conf: PathBuf,
        name: String,
        passphrase: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Vmcrypt,
    Qsd,
}

#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub kind: Kind,
    pub target: Target,
    pub label: String,
}

pub struct Server {
    child: Child,
    pub socket: PathBuf,
    /// The thread polling vmcrypt's control socket (`--poll-stats-ms`).
    poller: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
}

/// `--poll-stats-ms`: how often to ask vmcrypt for `query-stats` while it
/// is measured (an operator's monitoring), if at all.
pub static POLL_STATS_MS: OnceLock<u64> = OnceLock::new();

/// Asks `query-stats` every `ms` until `stop`; returns the answers read.
fn poll_stats(control: PathBuf, ms: u64, stop: Arc<AtomicBool>) -> u64 {
    use std::io::{BufRead, BufReader, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&control) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("{}: {e}", control.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut n = 0;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        let req = format!("{{\"jsonrpc\":\"2.0\",\"id\":{n},\"method\":\"query-stats\"}}\n");
        if writer.write_all(req.as_bytes()).is_err() {
            break;
        }
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(ms));
    }
    n
}

impl Server {
    pub fn start(
        spec: &ServerSpec,
        vmcrypt: &Path,
        dir: &Path,
        queues: u32,
        direct: bool,
    ) -> Result<Server, String> {
        let qsd_cache = if direct {
            "cache.direct=on,aio=io_uring"
        } else {
            "cache.direct=off"
        };
        let socket = dir.join(format!("{}.sock", spec.label.replace(['/', ' '], "-")));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = match spec.kind {
            Kind::Vmcrypt => {
                let mut c = Command::new(vmcrypt);
                c.arg("serve").arg("--socket").arg(&socket);
                if POLL_STATS_MS.get().is_some() {
                    c.arg("--control").arg(socket.with_extension("ctl"));
                }
                c.args(["--num-queues", &queues.to_string()]);
                if direct && !matches!(spec.target, Target::Null { .. }) {
                    c.args(["--cache", "none"]);
                }
                match std::env::var("BENCH_VMCRYPT_ARGS") {
                    Ok(extra) => c.args(extra.split_whitespace()),
                    Err(_) => c.args(["--log-level", "warn"]),
                };
                match &spec.target {
                    Target::Null { size } => c.arg("--image").arg(format!("null:{size}")),
                    Target::Raw { image } => c.arg("--image").arg(image),
                    Target::Luks { image, passphrase } => c
                        .arg("--image")
                        .arg(image)
                        .arg("--passphrase-file")
                        .arg(passphrase),
                    Target::Rbd {
                        conf,
                        name,
                        passphrase,
                    } => {
                        c.arg("--image")
                            .arg(format!("rbd:rbd/{name}"))
                            .arg("--ceph-conf")
                            .arg(conf);
                        match passphrase {
                            Some(p) => c.arg("--passphrase-file").arg(p),
                            None => c.args(["--format", "raw"]),
                        }
                    }
                };
                c
            }
            Kind::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                match &spec.target {
                    Target::Null { size } => {
                        c.arg("--blockdev").arg(format!(
                            "driver=null-co,node-name=d0,size={size},read-zeroes=on"
                        ));
                    }
                    Target::Raw { image } => {
                        c.arg("--blockdev").arg(format!(
                            "driver=file,node-name=f0,filename={},{qsd_cache}",
                            image.display()
                        ));
                        c.arg("--blockdev").arg("driver=raw,node-name=d0,file=f0");
                    }
                    Target::Luks { image, passphrase } => {
                        c.arg("--object")
                            .arg(format!("secret,id=s0,file={}", passphrase.display()));
                        c.arg("--blockdev").arg(format!(
                            "driver=file,node-name=f0,filename={},{qsd_cache}",
                            image.display()
                        ));
                        c.arg("--blockdev")
                            .arg("driver=luks,node-name=d0,file=f0,key-secret=s0");
                    }
                    Target::Rbd {
                        conf,
                        name,
                        passphrase,
                    } => {
                        let rbd =
                            format!("driver=rbd,pool=rbd,image={name},conf={}", conf.display());
                        match passphrase {
                            Some(p) => {
                                c.arg("--object")
                                    .arg(format!("secret,id=s0,file={}", p.display()));
                                c.arg("--blockdev").arg(format!("{rbd},node-name=f0"));
                                c.arg("--blockdev")
                                    .arg("driver=luks,node-name=d0,file=f0,key-secret=s0");
                            }
                            None => {
                                c.arg("--blockdev").arg(format!("{rbd},node-name=d0"));
                            }
                        }
                    }
                }
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                    socket.display()
                ));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", spec.label))?;
        let mut s = Server {
            child,
            socket,
            poller: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.socket.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!("{} exited at start: {st}", spec.label));
            }
            if Instant::now() > deadline {
                return Err(format!("{}: socket did not appear", spec.label));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // vmcrypt's socket exists once it listens; QSD's likewise.
        std::thread::sleep(Duration::from_millis(50));
        if let (Kind::Vmcrypt, Some(&ms)) = (spec.kind, POLL_STATS_MS.get()) {
            let stop = Arc::new(AtomicBool::new(false));
            let control = s.socket.with_extension("ctl");
            let st = stop.clone();
            let h = std::thread::spawn(move || poll_stats(control, ms, st));
            s.poller = Some((stop, h));
        }
        Ok(s)
    }

    /// CPU time (user + system) the server has used, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which is in parentheses).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after ')'.
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }

    pub fn stop(mut self) {
        if let Some((stop, h)) = self.poller.take() {
            stop.store(true, Ordering::Relaxed);
            let n = h.join().unwrap_or(0);
            eprintln!("  (polled query-stats {n} times)");
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.poller {
            stop.store(true, Ordering::Relaxed);
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
