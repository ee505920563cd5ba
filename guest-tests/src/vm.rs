//! Booting a guest with vhost-user-blk disks and collecting what it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::GuestImage;
use crate::qemu::Qemu;

/// A vhost-user-blk disk served on `socket`.
#[derive(Clone, Debug)]
pub struct Disk {
    pub socket: PathBuf,
    pub num_queues: u32,
    /// QEMU reconnects to the socket if the backend goes away.
    pub reconnect: bool,
    /// More `-device vhost-user-blk-pci` properties, e.g. `,event_idx=off`.
    pub device_opts: String,
}

impl Disk {
    pub fn new(socket: &Path) -> Disk {
        Disk {
            socket: socket.into(),
            num_queues: 2,
            reconnect: false,
            device_opts: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self, tcg_single_thread: bool, cpu: Option<&str>) -> Vec<String> {
        let (accel, default_cpu) = match self {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg if tcg_single_thread => ("tcg,thread=single", "max"),
            Accel::Tcg => ("tcg,thread=multi", "max"),
        };
        ["-accel", accel, "-cpu", cpu.unwrap_or(default_cpu)]
            .map(String::from)
            .to_vec()
    }

    /// KVM if a short probe boot shows it works, else TCG. The answer is
    /// cached for the host's current boot.
    pub fn detect(image: &GuestImage) -> Accel {
        if let Ok(v) = std::env::var("VMCRYPT_GUEST_ACCEL") {
            return if v == "kvm" { Accel::Kvm } else { Accel::Tcg };
        }
        let boot_id =
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let cache = image.dir.join(format!("accel-{}", boot_id.trim()));
        if let Ok(v) = std::fs::read_to_string(&cache) {
            return if v == "kvm" { Accel::Kvm } else { Accel::Tcg };
        }
        let works = Path::new("/dev/kvm").exists() && {
            let work = tempfile::tempdir().unwrap();
            let vm = Vm {
                cpus: 1,
                mem_mb: 256,
                timeout: Duration::from_secs(20),
                ..Vm::new(image, Accel::Kvm)
            };
            vm.run("true", work.path()).is_ok_and(|r| r.rc == Some(0))
        };
        let accel = if works { Accel::Kvm } else { Accel::Tcg };
        let _ = std::fs::write(&cache, if works { "kvm" } else { "tcg" });
        accel
    }
}

/// A guest to boot.
#[derive(Clone, Debug)]
pub struct Vm {
    pub image: GuestImage,
    pub disks: Vec<Disk>,
    pub cpus: u32,
    pub mem_mb: u32,
    pub accel: Accel,
    pub timeout: Duration,
    /// More QEMU arguments.
    pub extra: Vec<String>,
    /// Under TCG, one host thread for all vCPUs (`thread=single`) instead
    /// of one per vCPU.
    pub tcg_single_thread: bool,
    /// The `-cpu` model, if not the accelerator's default (`max`, `host`).
    pub cpu: Option<String>,
    /// Guest RAM in a shared memfd, as vhost-user devices need (the default);
    /// without, QEMU's own anonymous memory.
    pub shared_memory: bool,
    /// The QEMU to boot with: the host's unless a test chooses another.
    pub qemu: Qemu,
}

/// A booted guest.
pub struct RunningVm {
    child: std::process::Child,
    console: PathBuf,
    qemu_err: PathBuf,
    start: Instant,
    timeout: Duration,
}

impl RunningVm {
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Gives the guest `more` time beyond its timeout.
    pub fn extend_timeout(&mut self, more: Duration) {
        self.timeout = self.start.elapsed() + more;
    }

    /// Waits until the console shows `marker`.
    pub fn wait_for(&mut self, marker: &str) -> Result<(), String> {
        loop {
            if self.console().contains(marker) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "guest stopped ({st}) before '{marker}':\n{}",
                    self.console()
                ));
            }
            if self.start.elapsed() > self.timeout {
                return Err(format!(
                    "no '{marker}' within {:?}:\n{}",
                    self.timeout,
                    self.console()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What QEMU printed on stderr so far.
    pub fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(&self.qemu_err).unwrap_or_default()
    }

    /// Waits for the guest to power off and collects what it printed.
    pub fn finish(self) -> Result<GuestRun, String> {
        self.finish_after("")
    }

    /// As `finish`, with `before` (what the guest printed on the source of a
    /// migration) in front of this console's output.
    pub fn finish_after(mut self, before: &str) -> Result<GuestRun, String> {
        let status = loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                break Some(s);
            }
            if self.start.elapsed() > self.timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let console = format!("{before}{}", self.console());
        let qemu_err = std::fs::read_to_string(&self.qemu_err).unwrap_or_default();
        GuestRun::from_console(
            console,
            self.start.elapsed().as_secs_f64(),
            status.is_some(),
            self.timeout,
            &qemu_err,
        )
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a guest run printed.
#[derive(Debug)]
pub struct GuestRun {
    pub console: String,
    /// The script's exit code, if the guest got that far.
    pub rc: Option<i32>,
    pub seconds: f64,
}

impl GuestRun {
    /// Reads the script's exit code from a console log; an error if the
    /// guest timed out or stopped before its script finished.
    pub fn from_console(
        console: String,
        seconds: f64,
        exited: bool,
        timeout: Duration,
        extra: &str,
    ) -> Result<GuestRun, String> {
        let rc = console.lines().find_map(|l| {
            l.trim()
                .strip_prefix("=== GUEST-EXIT rc=")
                .and_then(|v| v.trim().parse().ok())
        });
        let run = GuestRun {
            console,
            rc,
            seconds,
        };
        if !exited {
            return Err(format!(
                "guest did not finish within {timeout:?}; console:\n{}\n{extra}",
                run.tail()
            ));
        }
        if run.rc.is_none() {
            return Err(format!(
                "guest stopped before its script finished; console:\n{}\n{extra}",
                run.tail()
            ));
        }
        Ok(run)
    }

    /// The lines a script printed between `=== BEGIN name` and `=== END name`.
    pub fn section(&self, name: &str) -> Option<String> {
        let begin = format!("=== BEGIN {name}");
        let end = format!("=== END {name}");
        let start = self.console.find(&begin)? + begin.len();
        let stop = start + self.console[start..].find(&end)?;
        Some(self.console[start..stop].trim().replace('\r', ""))
    }

    /// A fio JSON report printed in section `name`.
    pub fn fio(&self, name: &str) -> Result<serde_json::Value, String> {
        let text = self
            .section(name)
            .ok_or_else(|| format!("no section {name} in the console:\n{}", self.tail()))?;
        // fio may print notes before the JSON object.
        let json = &text[text.find('{').ok_or("no JSON in fio's output")?..];
        serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}\n{json}"))
    }

    /// The end of the console log, for failure messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

/// IOPS, bandwidth and latency of one fio job, for people to read.
pub fn fio_summary(report: &serde_json::Value) -> String {
    let mut out = String::new();
    for job in report["jobs"].as_array().into_iter().flatten() {
        for dir in ["read", "write"] {
            let d = &job[dir];
            let ios = d["total_ios"].as_u64().unwrap_or(0);
            if ios == 0 {
                continue;
            }
            out.push_str(&format!(
                "{} {dir}: {:.0} IOPS, {:.1} MiB/s, mean latency {:.0} us, p99 {:.0} us\n",
                job["jobname"].as_str().unwrap_or("?"),
                d["iops"].as_f64().unwrap_or(0.0),
                d["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                d["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
                d["clat_ns"]["percentile"]["99.000000"]
                    .as_f64()
                    .unwrap_or(0.0)
                    / 1000.0,
            ));
        }
    }
    out
}

/// Total errors fio reports over all jobs.
pub fn fio_errors(report: &serde_json::Value) -> u64 {
    report["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| j["error"].as_u64().unwrap_or(1))
        .sum()
}

impl Vm {
    pub fn new(image: &GuestImage, accel: Accel) -> Vm {
        Vm {
            image: image.clone(),
            disks: vec![],
            cpus: 2,
            mem_mb: 1024,
            accel,
            timeout: Duration::from_secs(240),
            extra: vec![],
            tcg_single_thread: false,
            cpu: None,
            shared_memory: true,
            qemu: Qemu::for_guests().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// The QEMU command line (without the script-specific initrd).
    pub fn command(&self, initrd: &Path, console: &Path) -> Command {
        let mut c = Command::new(&self.qemu.binary);
        c.args(self.qemu.data_args());
        c.args([
            "-machine",
            "q35",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        c.args(self.accel.args(self.tcg_single_thread, self.cpu.as_deref()));
        c.args([
            "-smp",
            &self.cpus.to_string(),
            "-m",
            &format!("{}M", self.mem_mb),
        ]);
        if self.shared_memory {
            c.args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={}M,share=on", self.mem_mb),
            ]);
            c.args(["-numa", "node,memdev=mem"]);
        }
        c.arg("-kernel").arg(&self.image.kernel);
        c.arg("-initrd").arg(initrd);
        c.args(["-append", "console=ttyS0 quiet panic=-1 loglevel=3"]);
        c.arg("-serial").arg(format!("file:{}", console.display()));
        for (i, d) in self.disks.iter().enumerate() {
            let reconnect = if d.reconnect { ",reconnect=1" } else { "" };
            c.args([
                "-chardev",
                &format!("socket,id=c{i},path={}{reconnect}", d.socket.display()),
            ]);
            c.args([
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=c{i},num-queues={}{}",
                    d.num_queues, d.device_opts
                ),
            ]);
        }
        c.args(&self.extra);
        c
    }

    /// Boots the guest, runs `script` in it and waits for it to power off.
    pub fn run(&self, script: &str, work: &Path) -> Result<GuestRun, String> {
        self.spawn(script, work)?.finish()
    }

    /// Boots the guest with `script` and returns while it runs.
    pub fn spawn(&self, script: &str, work: &Path) -> Result<RunningVm, String> {
        let initrd = self.image.with_script(script, work)?;
        self.spawn_with(&initrd, work, "guest", &[])
    }

    /// Starts QEMU with a prepared `initrd`, its console and logs named
    /// after `name` in `work`, and `extra` arguments (a QMP socket, or
    /// `-incoming` for the destination of a migration, which must be started
    /// with the same initrd as its source).
    pub fn spawn_with(
        &self,
        initrd: &Path,
        work: &Path,
        name: &str,
        extra: &[String],
    ) -> Result<RunningVm, String> {
        let console = work.join(format!("{name}.console.log"));
        let _ = std::fs::remove_file(&console);
        let qemu_err = work.join(format!("{name}.qemu.err"));
        let child = self
            .command(initrd, &console)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(work.join(format!("{name}.qemu.log"))).unwrap())
            .stderr(std::fs::File::create(&qemu_err).unwrap())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.qemu.binary.display()))?;
        Ok(RunningVm {
            child,
            console,
            qemu_err,
            start: Instant::now(),
            timeout: self.timeout,
        })
    }
}
