//! The syscall allow-list `serve` installs once it has started.
//!
//! Everything that needs the wider system (reading the config, binding the
//! socket, fetching keys from the KMS over TLS, opening the image) happens
//! before; afterwards the daemon only accepts frontends, maps guest memory,
//! moves data with io_uring and answers signals. A syscall outside the list
//! (for example `execve`, `socket(AF_INET)` or `open`) means the process has
//! been subverted or has hit an untested path: by default vmcrypt then logs
//! the syscall number on stderr and exits (`--seccomp on`). Opening a file
//! is the exception: it fails with EACCES (the C library tries one file at
//! run time and copes without it).
//!
//! Two kinds of threads get different rights over files. The control
//! socket's threads may create *new* files (`O_CREAT|O_EXCL`, relative to
//! the snapshot folder: a snapshot and its key descriptor) and remove them
//! again, and the signal thread may remove the socket files at shutdown;
//! neither may open an existing file. Every other thread (the vhost-user
//! protocol, the queues that handle guest requests) can neither open nor
//! create nor remove files: after `install`, the control and signal
//! threads are started, then `confine_this_thread` stacks a stricter
//! filter on the main thread, which all later threads inherit. `--seccomp log`
//! lets such calls through and leaves a record in the kernel's audit log;
//! `--seccomp off` installs nothing.
//!
//! The list is per syscall, with the arguments checked where a syscall
//! covers both harmless and dangerous uses (`socket`, `ioctl`, `fcntl`,
//! `prctl`, `clone`, `mprotect`).
//!
//! Operations submitted through io_uring are not syscalls and seccomp never
//! sees them: the rings are made disabled, restricted to the few opcodes of
//! the data path on the image's registered descriptor
//! (`IORING_REGISTER_RESTRICTIONS`), then enabled (see `storage`). `clone3`
//! fails with ENOSYS (its flags are out of seccomp's sight) so threads are
//! made with `clone`, whose flags are checked; `tgkill` reaches this
//! process's threads only; no mapping is made or changed to executable.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};

/// `--seccomp`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// A syscall outside the list ends the daemon with its number on stderr.
    #[default]
    On,
    /// Syscalls outside the list are allowed and recorded in the kernel's
    /// audit log (to build a list for a new platform).
    Log,
    /// No filter.
    Off,
}

/// Errors from building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: building the syscall filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("seccomp: installing the syscall filter: {0} (run with --seccomp off where seccomp is unavailable)")]
    Install(#[from] seccompiler::Error),
    #[error("seccomp: installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Exit status after a blocked syscall: 128 + SIGSYS, as a shell reports a
/// process killed by the signal.
pub const BLOCKED_EXIT: i32 = 128 + libc::SIGSYS;

/// The folders the control and signal threads use, by descriptor (opened
/// before the filter is installed): they create and remove names with
/// `openat` and `unlinkat` relative to them, and the filter refuses those
/// calls on any other descriptor, and `open`/`unlink` by path. That
/// catches a relative name used by mistake; it is no confinement of
/// paths (an absolute name ignores the descriptor, and seccomp cannot
/// read it): keeping snapshots in their folder is the control code's own
/// check (one file name, `openat` on the held folder).
#[derive(Clone, Debug, Default)]
pub struct FileRights {
    /// Where the control threads create new files (snapshots).
    pub create_in: Option<RawFd>,
    /// Where the signal thread removes names (the sockets vmcrypt bound,
    /// at shutdown).
    pub remove_in: Vec<RawFd>,
}

/// Installs the allow-list on every thread of the process (threads started
/// later inherit it). Files may still be created in `rights.create_in`,
/// not opened: call [`confine_this_thread`] once the threads that create
/// files have started.
///
/// `network`: the storage is reached over the network (Ceph RBD): librados'
/// threads may open TCP connections to the cluster (a monitor or OSD that
/// restarts, a new OSD) for as long as the daemon runs.
pub fn install(mode: SeccompMode, network: bool, rights: &FileRights) -> Result<(), SeccompError> {
    let action = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::On => {
            install_sigsys_handler().map_err(SeccompError::Handler)?;
            // Stacked filters: the kernel takes the strictest answer, so an
            // open fails with EACCES although the allow-list lets it pass.
            seccompiler::apply_filter_all_threads(&create_only_program(rights)?)?;
            seccompiler::apply_filter_all_threads(&enosys_program()?)?;
            SeccompAction::Trap
        }
        SeccompMode::Log => SeccompAction::Log,
    };
    seccompiler::apply_filter_all_threads(&program_for(action, network)?)?;
    tracing::info!(
        mode = ?mode,
        syscalls = allowed(network).len(),
        network,
        "seccomp filter installed"
    );
    Ok(())
}

/// Takes from this thread, and every thread it starts from now on, the
/// right to create or remove files.
pub fn confine_this_thread(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::On {
        seccompiler::apply_filter(&no_open_program()?)?;
    }
    Ok(())
}

/// The compiled filter: the allow-list, `mismatch` for everything else.
pub fn program(mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    program_for(mismatch, false)
}

/// As [`program`], with the network calls of a Ceph client if `network`.
pub fn program_for(mismatch: SeccompAction, network: bool) -> Result<BpfProgram, SeccompError> {
    compile(allowed(network), mismatch, SeccompAction::Allow)
}

/// Opening files fails with EACCES instead of ending the daemon: the C
/// library opens `/proc/sys/vm/overcommit_memory` the first time a thread's
/// heap shrinks, and does without it when that fails. Removing a file
/// fails the same way.
pub fn no_open_program() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        open_syscalls().into_iter().map(|nr| (nr, vec![])).collect();
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_unlink, vec![]);
    rules.insert(libc::SYS_unlinkat, vec![]);
    compile(rules, SeccompAction::Allow, eacces())
}

/// Like [`no_open_program`], except that `openat` with `O_CREAT|O_EXCL`
/// relative to `rights.create_in` (a new file in that folder, never an
/// existing one or a symlink) passes, and so does `unlinkat` there.
pub fn create_only_program(rights: &FileRights) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let openat = match rights.create_in {
        Some(dir) => any_of([
            masked_eq(2, libc::O_CREAT as u64, 0),
            masked_eq(2, libc::O_EXCL as u64, 0),
            ne(0, dir as u64),
        ]),
        None => vec![],
    };
    rules.insert(libc::SYS_openat, openat);
    // By path from the working directory, or with flags in memory seccomp
    // cannot read: never.
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_open, vec![]);
    rules.insert(libc::SYS_openat2, vec![]);
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_unlink, vec![]);
    let removable: Vec<RawFd> = rights
        .remove_in
        .iter()
        .copied()
        .chain(rights.create_in)
        .collect();
    rules.insert(libc::SYS_unlinkat, outside(0, &removable));
    compile(rules, SeccompAction::Allow, eacces())
}

/// `clone3` fails with ENOSYS: its flags are in memory seccomp cannot
/// read, and the C library then makes threads with `clone`, whose flags
/// the allow-list checks.
pub fn enosys_program() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// Rules that match when argument `arg` is none of `fds` (always, if
/// `fds` is empty).
fn outside(arg: u8, fds: &[RawFd]) -> Vec<SeccompRule> {
    if fds.is_empty() {
        return vec![];
    }
    vec![SeccompRule::new(fds.iter().map(|&fd| ne(arg, fd as u64)).collect()).expect("conditions")]
}

/// Compiles `rules` for this architecture: `matched` for a call a rule
/// matches, `mismatch` for every other call.
fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(SeccompError::Build)?;
    Ok(SeccompFilter::new(rules, mismatch, matched, arch)?.try_into()?)
}

fn eacces() -> SeccompAction {
    SeccompAction::Errno(libc::EACCES as u32)
}

fn open_syscalls() -> Vec<i64> {
    let mut v = vec![libc::SYS_openat, libc::SYS_openat2];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_open);
    v
}

fn eq(arg: u8, value: u64) -> SeccompCondition {
    // Only fails for an argument index over 5.
    SeccompCondition::new(arg, Len::Dword, Op::Eq, value).expect("valid condition")
}

fn ne(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, Len::Dword, Op::Ne, value).expect("valid condition")
}

fn masked_eq(arg: u8, mask: u64, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, Len::Qword, Op::MaskedEq(mask), value).expect("valid condition")
}

/// One rule per alternative: the syscall is allowed when any rule matches.
fn any_of(conditions: impl IntoIterator<Item = SeccompCondition>) -> Vec<SeccompRule> {
    conditions
        .into_iter()
        .map(|c| SeccompRule::new(vec![c]).expect("one condition"))
        .collect()
}

/// The syscalls `serve` makes once started, with argument rules where they
/// matter. An empty rule list allows the syscall with any arguments.
fn allowed(network: bool) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let any: &[libc::c_long] = &[
        // Accepting frontends and the vhost-user protocol (fds in SCM_RIGHTS).
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        // Event loops, kicks, calls, timers.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        // Data path: the rings (made before the filter: a ring made later
        // would carry no restrictions), and the synchronous fall-backs.
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        // The hand-over drops a stale page cache (POSIX_FADV_DONTNEED).
        libc::SYS_fadvise64,
        libc::SYS_fstat,
        // Whether the image is on a network file system (the hand-over).
        libc::SYS_fstatfs,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_flock,
        libc::SYS_close,
        libc::SYS_dup,
        // A snapshot: created by the control thread, synced with its file
        // system, removed again if it fails (see `confine_this_thread`).
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_syncfs,
        // Guest memory, the in-flight region and the dirty log (mmap: below).
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Whether an encrypted read is all in the page cache (`pagecache`).
        libc::SYS_mincore,
        libc::SYS_mlock,
        libc::SYS_munlock,
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_brk,
        // Threads (one per queue, per connection) and their synchronisation.
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_clone3,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Signals: the signal thread, shutdown and exit.
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    for &nr in any {
        m.insert(nr, vec![]);
    }
    // Allowed here, refused with EACCES by the filter stacked on this one
    // (`no_open_program`).
    for nr in open_syscalls() {
        m.insert(nr, vec![]);
    }
    // Unix sockets only: no network once started, unless the storage is
    // on the network (RBD), whose client connects over TCP.
    if network {
        m.insert(
            libc::SYS_socket,
            any_of([libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].map(|f| eq(0, f as u64))),
        );
        for nr in [
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_getpeername,
            libc::SYS_poll,
            libc::SYS_epoll_create,
            libc::SYS_pipe2,
            libc::SYS_uname,
        ] {
            m.insert(nr, vec![]);
        }
    } else {
        m.insert(libc::SYS_socket, any_of([eq(0, libc::AF_UNIX as u64)]));
    }
    // New threads. clone's flags must hold CLONE_THREAD; clone3 passes its
    // flags in memory seccomp cannot read, so it is allowed as it is (a
    // process made with it would still inherit this filter: no execve).
    m.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![masked_eq(
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )])
        .expect("one condition")],
    );
    // No executable mappings made later, new or changed.
    for nr in [libc::SYS_mprotect, libc::SYS_mmap] {
        m.insert(
            nr,
            vec![
                SeccompRule::new(vec![masked_eq(2, libc::PROT_EXEC as u64, 0)])
                    .expect("one condition"),
            ],
        );
    }
    // Signals to this process's own threads only (the C library's
    // pthread_kill, abort).
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    m.insert(libc::SYS_tgkill, any_of([eq(0, me as u64)]));
    m.insert(
        libc::SYS_fcntl,
        any_of(
            [
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_DUPFD_CLOEXEC,
                libc::F_ADD_SEALS,
                libc::F_GET_SEALS,
                libc::F_OFD_GETLK,
                libc::F_OFD_SETLK,
                libc::F_OFD_SETLKW,
            ]
            .map(|cmd| eq(1, cmd as u64)),
        ),
    );
    m.insert(
        libc::SYS_ioctl,
        any_of(
            [
                libc::FIONBIO,
                libc::FIOCLEX,
                BLKDISCARD,
                BLKZEROOUT,
                BLKGETSIZE64,
                BLKSSZGET,
                BLKPBSZGET,
                libc::TCGETS,
                crate::storage::FICLONE,
            ]
            .map(|cmd| eq(1, cmd)),
        ),
    );
    m.insert(
        libc::SYS_prctl,
        any_of(
            [
                libc::PR_SET_NAME,
                libc::PR_GET_NAME,
                libc::PR_SET_NO_NEW_PRIVS,
            ]
            .map(|op| eq(0, op as u64)),
        ),
    );
    // Stacking a further filter, which can only take rights away
    // (`confine_this_thread`).
    m.insert(
        libc::SYS_seccomp,
        any_of([eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)]),
    );
    m
}

// <linux/fs.h>: _IO(0x12, 119), _IO(0x12, 127), _IOR(0x12, 114, size_t),
// _IO(0x12, 104), _IO(0x12, 123).
const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;
const BLKGETSIZE64: u64 = 0x8008_1272;
const BLKSSZGET: u64 = 0x1268;
const BLKPBSZGET: u64 = 0x127b;

/// SIGSYS from the filter: say which syscall, then exit. Only
/// async-signal-safe calls (`write`, `_exit`), no allocation.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers;
    // for SIGSYS its union holds `struct { void *call_addr; int syscall;
    // unsigned arch; }` right after the three leading ints and padding, at
    // byte 16 + 8 on 64-bit targets.
    let nr = unsafe { *info.cast::<u8>().add(24).cast::<libc::c_int>() };
    let mut buf = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"vmcrypt: error: seccomp blocked syscall ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b"; exiting (report this; --seccomp log lets it through)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is
    // initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(BLOCKED_EXIT);
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    crate::sys::install_siginfo_handler(libc::SIGSYS, on_sigsys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with the filter installed and returns the
    /// child's wait status. The filter is compiled before the fork, so the
    /// child makes no allocation before `f`.
    fn in_filtered_child(mode: SeccompMode, f: fn() -> i32) -> libc::c_int {
        in_child(mode, false, f)
    }

    /// As [`in_filtered_child`]; `confined` also stacks the filter of the
    /// threads that serve guests.
    fn in_child(mode: SeccompMode, confined: bool, f: fn() -> i32) -> libc::c_int {
        let action = match mode {
            SeccompMode::On => SeccompAction::Trap,
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::Off => unreachable!(),
        };
        let program = program(action).unwrap();
        let dir = TEST_DIR.load(std::sync::atomic::Ordering::SeqCst);
        let rights = FileRights {
            create_in: (dir >= 0).then_some(dir),
            remove_in: vec![],
        };
        let create_only = create_only_program(&rights).unwrap();
        let no_open = no_open_program().unwrap();
        let enosys = enosys_program().unwrap();
        // SAFETY: the child only calls async-signal-safe functions (sigaction,
        // prctl, seccomp, the syscalls in `f`, _exit) before exiting.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                if mode == SeccompMode::On && install_sigsys_handler().is_err() {
                    libc::_exit(101);
                }
                if mode == SeccompMode::On && seccompiler::apply_filter(&create_only).is_err() {
                    libc::_exit(103);
                }
                if mode == SeccompMode::On && seccompiler::apply_filter(&enosys).is_err() {
                    libc::_exit(105);
                }
                if confined && seccompiler::apply_filter(&no_open).is_err() {
                    libc::_exit(104);
                }
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(102);
                }
                libc::_exit(f());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    fn exit_code(status: libc::c_int) -> i32 {
        assert!(
            libc::WIFEXITED(status),
            "child ended by a signal: {status:#x}"
        );
        libc::WEXITSTATUS(status)
    }

    /// Opens an IPv4 socket (what a subverted daemon would use to send
    /// keys away): 0 if it got one.
    fn ipv4_socket() -> i32 {
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        i32::from(fd < 0)
    }

    #[test]
    fn a_forbidden_syscall_ends_the_process_with_its_number() {
        let status = in_filtered_child(SeccompMode::On, ipv4_socket);
        assert_eq!(exit_code(status), BLOCKED_EXIT);
    }

    #[test]
    fn execve_is_forbidden_and_open_fails() {
        let status = in_filtered_child(SeccompMode::On, || {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: valid NUL-terminated path and argv; the call never
            // returns if it succeeds.
            unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            0
        });
        assert_eq!(exit_code(status), BLOCKED_EXIT);
        let status = in_filtered_child(SeccompMode::On, || {
            // SAFETY: valid NUL-terminated path.
            let fd = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
            match (fd, std::io::Error::last_os_error().raw_os_error()) {
                (-1, Some(libc::EACCES)) => 7,
                _ => 1,
            }
        });
        assert_eq!(exit_code(status), 7, "open did not fail with EACCES");
    }

    #[test]
    fn allowed_syscalls_work_under_the_filter() {
        let status = in_filtered_child(SeccompMode::On, || {
            // SAFETY: plain syscalls on descriptors made here.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let efd = libc::eventfd(0, libc::EFD_CLOEXEC);
                let v: u64 = 1;
                let wrote = libc::write(efd, (&v as *const u64).cast(), 8);
                // What the hand-over does to a file (here on a non-file:
                // the error is fine, SIGSYS would not be).
                libc::posix_fadvise(efd, 0, 0, libc::POSIX_FADV_DONTNEED);
                if fd >= 0 && efd >= 0 && wrote == 8 {
                    0
                } else {
                    1
                }
            }
        });
        assert_eq!(exit_code(status), 0);
    }

    /// The folder the control threads may create files in, for the child
    /// (-1: none). Tests that set it hold `DIR_LOCK`.
    static TEST_DIR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
    static DIR_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Creates a new file in `TEST_DIR` and removes it: 0 if both worked, 7
    /// if the creation failed with EACCES, 8 if the removal did, 1 otherwise.
    fn create_new_file() -> i32 {
        let dir = TEST_DIR.load(std::sync::atomic::Ordering::SeqCst);
        let name = c"new-file";
        // SAFETY: valid NUL-terminated name; plain syscalls.
        unsafe {
            libc::unlinkat(dir, name.as_ptr(), 0);
            let fd = libc::openat(
                dir,
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EACCES) => 7,
                    _ => 1,
                };
            }
            libc::close(fd);
            if libc::unlinkat(dir, name.as_ptr(), 0) != 0 {
                return match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EACCES) => 8,
                    _ => 1,
                };
            }
            0
        }
    }

    /// 7 if `rc` is a failure with EACCES, else 1.
    fn eacces_code(rc: libc::c_int) -> i32 {
        match (rc, std::io::Error::last_os_error().raw_os_error()) {
            (-1, Some(libc::EACCES)) => 7,
            _ => 1,
        }
    }

    #[test]
    fn only_the_control_threads_may_create_files_and_only_in_their_folder() {
        let _lock = DIR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::sys::HeldDir::open(tmp.path()).unwrap();
        TEST_DIR.store(dir.fd(), std::sync::atomic::Ordering::SeqCst);
        let outcome = (
            exit_code(in_child(SeccompMode::On, false, create_new_file)),
            exit_code(in_child(SeccompMode::On, true, create_new_file)),
            // A new file anywhere else: by path, or relative to the working
            // directory.
            exit_code(in_child(SeccompMode::On, false, || {
                // SAFETY: valid NUL-terminated path.
                eacces_code(unsafe {
                    libc::open(
                        c"/tmp/vmcrypt-seccomp-elsewhere".as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                        0o600,
                    )
                })
            })),
            exit_code(in_child(SeccompMode::On, false, || {
                // SAFETY: valid NUL-terminated path.
                eacces_code(unsafe {
                    libc::openat(
                        libc::AT_FDCWD,
                        c"vmcrypt-seccomp-elsewhere".as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                        0o600,
                    )
                })
            })),
            // Removing a file elsewhere.
            exit_code(in_child(SeccompMode::On, false, || {
                // SAFETY: valid NUL-terminated path.
                eacces_code(unsafe { libc::unlink(c"/tmp/vmcrypt-seccomp-elsewhere".as_ptr()) })
            })),
        );
        TEST_DIR.store(-1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(outcome, (0, 7, 7, 7, 7));
        // Neither may open an existing file, for reading or writing.
        for confined in [false, true] {
            let status = in_child(SeccompMode::On, confined, || {
                // SAFETY: valid NUL-terminated path.
                eacces_code(unsafe {
                    libc::open(c"/tmp".as_ptr(), libc::O_RDONLY | libc::O_CREAT, 0)
                })
            });
            assert_eq!(exit_code(status), 7, "confined: {confined}");
        }
    }

    /// What a subverted daemon would use to run code of its own or to
    /// signal other processes: refused.
    #[test]
    fn executable_mappings_and_signals_to_others_are_refused() {
        let status = in_filtered_child(SeccompMode::On, || {
            // SAFETY: an anonymous mapping, never touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            i32::from(p == libc::MAP_FAILED)
        });
        assert_eq!(exit_code(status), BLOCKED_EXIT);
        let status = in_filtered_child(SeccompMode::On, || {
            // SAFETY: signal 0 only checks; pid 1 is not this process.
            unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) as i32 }
        });
        assert_eq!(exit_code(status), BLOCKED_EXIT);
        // Plain mappings still work.
        let status = in_filtered_child(SeccompMode::On, || {
            // SAFETY: an anonymous mapping, unmapped again.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                i32::from(p == libc::MAP_FAILED || libc::munmap(p, 4096) != 0)
            }
        });
        assert_eq!(exit_code(status), 0);
    }

    /// No new io_uring once filtered: it would carry no restrictions.
    #[test]
    fn no_ring_can_be_made_under_the_filter() {
        let status = in_filtered_child(SeccompMode::On, || {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup with a zeroed params buffer of its size.
            unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) as i32 }
        });
        assert_eq!(exit_code(status), BLOCKED_EXIT);
        // Threads are still made (the C library's clone, after clone3's ENOSYS).
        let status = in_filtered_child(SeccompMode::On, || {
            extern "C" fn run(_: *mut libc::c_void) -> *mut libc::c_void {
                std::ptr::null_mut()
            }
            let mut t: libc::pthread_t = 0;
            // SAFETY: a thread that returns at once, joined here.
            unsafe {
                if libc::pthread_create(&mut t, std::ptr::null(), run, std::ptr::null_mut()) != 0 {
                    return 1;
                }
                i32::from(libc::pthread_join(t, std::ptr::null_mut()) != 0)
            }
        });
        assert_eq!(exit_code(status), 0);
    }

    /// clone3 says ENOSYS, so the C library makes threads with clone, whose
    /// flags the filter checks.
    #[test]
    fn clone3_is_not_available() {
        let status = in_filtered_child(SeccompMode::On, || {
            // SAFETY: clone3 with a null argument; it fails either way.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            match (rc, std::io::Error::last_os_error().raw_os_error()) {
                (-1, Some(libc::ENOSYS)) => 9,
                _ => 1,
            }
        });
        assert_eq!(exit_code(status), 9);
    }

    #[test]
    fn log_mode_lets_forbidden_syscalls_through() {
        let status = in_filtered_child(SeccompMode::Log, ipv4_socket);
        assert_eq!(exit_code(status), 0);
    }
}
