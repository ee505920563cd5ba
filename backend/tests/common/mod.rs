//! Helpers shared by the integration tests: start the real `vmcrypt`
//! binary and drive its socket with libblkio as the vhost-user frontend.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use serde_json::{json, Value};

/// The `vmcrypt` under test: the one built beside the tests, or the one
/// `VMCRYPT_BIN` names (ci/package.sh runs the protocol tests against the
/// installed package's `/usr/bin/vmcrypt`).
pub fn bin() -> String {
    std::env::var("VMCRYPT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vmcrypt").to_string())
}

/// A running `vmcrypt serve`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `vmcrypt serve --socket SOCK ARGS...` and waits for the socket.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn vmcrypt");
        let mut d = Daemon { child, socket, log };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = std::fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket());
            if ready && self.log_text().contains("waiting for a frontend") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("vmcrypt exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "socket never appeared: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 10 s for the log to show `text`; fails with the log.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no '{text}' in:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon still runs (not exited, not a zombie).
    pub fn child_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits up to 30 s for the exit status (after a signal sent before:
    /// a second one would end a shutdown still under way).
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "vmcrypt did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio vhost-user-blk frontend with one buffer region.
pub struct Frontend {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

impl Frontend {
    pub fn connect(socket: &Path, num_queues: i32, buf_len: usize) -> Frontend {
        Self::connect_with(socket, num_queues, buf_len, false)
    }

    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        buf_len: usize,
        read_only: bool,
    ) -> Frontend {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        b.set_bool("read-only", read_only).unwrap();
        b.connect().expect("connect");
        b.set_i32("num-queues", num_queues).unwrap();
        let out = b.start().expect("start");
        let capacity = b.get_u64("capacity").unwrap();
        let len = buf_len.next_multiple_of(2 << 20);
        let region = b.alloc_mem_region(len).unwrap();
        b.map_mem_region(&region).unwrap();
        Frontend {
            blkio: b,
            queues: out.queues,
            region,
            capacity,
        }
    }

    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: the region is a private mapping of region.len bytes owned by this frontend.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        (self.region.addr + off) as *mut u8
    }

    /// Waits for exactly one completion on queue `q`; returns its result.
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "no completion within 30 s");
        // SAFETY: do_io initialised the first n completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].write(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }
}

/// A deterministic pattern for `len` bytes, distinct per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An empty (sparse) image of `size` bytes, `disk.img` in `dir`.
pub fn sparse_image(dir: &Path, size: u64) -> PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    img
}

/// A file's page cache from `off` to its end, from cachestat(2) (Linux 6.5+).
#[derive(Debug, Default)]
#[repr(C)]
pub struct CacheStat {
    pub cache: u64,
    pub dirty: u64,
    pub writeback: u64,
    pub evicted: u64,
    pub recently_evicted: u64,
}

/// None where the kernel lacks cachestat(2).
pub fn cachestat(file: &std::fs::File, off: u64) -> Option<CacheStat> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off, len: 0 }; // len 0: to the end of the file
    let mut st = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live and laid
    // out as the kernel's struct cachestat_range and struct cachestat.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut CacheStat,
            0u32,
        )
    };
    (r == 0).then_some(st)
}

/// Reads 4 KiB at QD8 on queue 0 for `dur` (each request resubmitted as
/// it completes, all of them reaped at the end); IOPS.
pub fn read_iops(f: &mut Frontend, dur: Duration) -> f64 {
    let mut comps: Vec<std::mem::MaybeUninit<Completion>> =
        (0..8).map(|_| std::mem::MaybeUninit::uninit()).collect();
    for i in 0..8u64 {
        let p = f.ptr(i as usize * 4096);
        f.queues[0].read(i * 4096, p, 4096, i as usize, ReqFlags::empty());
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < dur {
        let mut t = Duration::from_secs(5);
        let n = f.queues[0]
            .do_io(&mut comps, 1, Some(&mut t), None)
            .unwrap();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0);
            done += 1;
            let i = c.user_data;
            let p = f.ptr(i * 4096);
            f.queues[0].read(i as u64 * 4096, p, 4096, i, ReqFlags::empty());
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut t = Duration::from_secs(5);
    let _ = f.queues[0].do_io(&mut comps, 8, Some(&mut t), None);
    done as f64 / elapsed
}

/// An XFS file system with reflinks on a loop device, mounted in a
/// temporary folder and unmounted when dropped (needs root and xfsprogs,
/// which ci/install-deps.sh installs).
pub struct Xfs {
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl Xfs {
    pub fn mount(size: u64) -> Xfs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            let out = Command::new(cmd)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{cmd}: {e} (install xfsprogs: ci/install-deps.sh)"));
            assert!(
                out.status.success(),
                "{cmd} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                img.as_os_str(),
            ],
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        );
        Xfs { _dir: dir, mnt }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// A frontend start that may fail (a device start the daemon refuses):
/// connect with one queue, start, map a buffer region.
pub fn try_start(socket: &Path) -> Result<Blkio, String> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| e.to_string())?;
    b.set_str("path", socket.to_str().unwrap())
        .map_err(|e| e.to_string())?;
    b.connect().map_err(|e| e.to_string())?;
    b.set_i32("num-queues", 1).map_err(|e| e.to_string())?;
    b.start().map_err(|e| e.to_string())?;
    let r = b.alloc_mem_region(2 << 20).map_err(|e| e.to_string())?;
    b.map_mem_region(&r).map_err(|e| e.to_string())?;
    Ok(b)
}

/// A JSON-RPC connection to a control socket.
pub struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    id: u64,
}

impl Rpc {
    pub fn connect(path: &Path) -> Rpc {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Rpc {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            id: 0,
        }
    }

    /// Sends `line` as it is and returns the answer line, parsed.
    pub fn raw(&mut self, line: &[u8]) -> Value {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        assert!(self.reader.read_line(&mut answer).unwrap() > 0, "no answer");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
    }

    /// Calls `method`; the whole answer.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let req = json!({"jsonrpc": "2.0", "id": self.id, "method": method, "params": params});
        let a = self.raw(req.to_string().as_bytes());
        assert_eq!(a["id"], self.id, "{a}");
        a
    }

    pub fn result(&mut self, method: &str, params: Value) -> Value {
        let a = self.call(method, params);
        assert!(a.get("error").is_none(), "{method}: {a}");
        a["result"].clone()
    }
}
