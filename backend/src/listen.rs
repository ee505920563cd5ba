//! Where the vhost-user socket comes from: a path vmcrypt binds itself, a
//! listening socket handed in as a file descriptor (`--socket-fd`, as
//! qemu-storage-daemon's `addr.type=fd`), or systemd socket activation
//! (`LISTEN_FDS`).

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Where to listen, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSpec {
    /// Bind this path (a stale socket file there is replaced).
    Path(PathBuf),
    /// A listening socket inherited as this descriptor.
    Fd(RawFd),
    /// The socket systemd passed (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`).
    Activated,
}

/// The name a systemd socket unit gives the vhost-user socket
/// (`FileDescriptorName=`) when it passes more than one.
pub const ACTIVATED_NAME: &str = "vhost-user";

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Errors getting the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket {path}: {reason}")]
    Path { path: PathBuf, reason: String },
    #[error("--socket-fd {fd}: {reason}")]
    Fd { fd: RawFd, reason: String },
    #[error("systemd socket activation: {0}")]
    Activation(String),
}

/// A listening socket, and the path to remove at shutdown if vmcrypt
/// created it.
#[derive(Debug)]
pub struct Listening {
    pub listener: UnixListener,
    pub owned_path: Option<PathBuf>,
    /// For logs: the path, or how the socket was handed in.
    pub describe: String,
}

/// Gets the listening socket `spec` names. `mode` and `group` apply only to
/// a socket vmcrypt binds; a handed-in socket keeps what its creator set.
///
/// Call this before starting threads: activation clears the `LISTEN_*`
/// variables from the environment.
pub fn open(spec: &SocketSpec, mode: u32, group: Option<&str>) -> Result<Listening, ListenError> {
    match spec {
        SocketSpec::Path(path) => Ok(Listening {
            listener: bind(path, mode, group)?,
            owned_path: Some(path.clone()),
            describe: path.display().to_string(),
        }),
        SocketSpec::Fd(fd) => Ok(Listening {
            listener: adopt(*fd).map_err(|reason| ListenError::Fd { fd: *fd, reason })?,
            owned_path: None,
            describe: format!("fd {fd}"),
        }),
        SocketSpec::Activated => {
            let fd = activated_fd()?;
            let listener = adopt(fd)
                .map_err(|reason| ListenError::Activation(format!("descriptor {fd}: {reason}")))?;
            Ok(Listening {
                listener,
                owned_path: None,
                describe: format!("systemd-passed fd {fd}"),
            })
        }
    }
}

/// Whether systemd passed sockets to this process.
pub fn activation_requested() -> bool {
    std::env::var_os("LISTEN_FDS").is_some()
}

/// Picks the vhost-user socket from what systemd passed: the only one, or
/// the one named [`ACTIVATED_NAME`].
fn activated_fd() -> Result<RawFd, ListenError> {
    let err = |m: String| ListenError::Activation(m);
    let var = |name: &str| std::env::var(name).ok();
    let pid =
        var("LISTEN_PID").ok_or_else(|| err("LISTEN_FDS is set but LISTEN_PID is not".into()))?;
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Err(err(format!(
            "LISTEN_PID={pid} is not this process ({}): the sockets were meant for another",
            std::process::id()
        )));
    }
    let count = var("LISTEN_FDS")
        .and_then(|n| n.trim().parse::<i32>().ok())
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| err("LISTEN_FDS is not a count from 1 to 64".into()))?;
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    // The variables are for this process only, not for its children.
    // SAFETY: called at start, before serve starts any thread (see `open`).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if count == 1 {
        return Ok(LISTEN_FDS_START);
    }
    match names.iter().position(|n| n == ACTIVATED_NAME) {
        Some(i) if (i as i32) < count => Ok(LISTEN_FDS_START + i as i32),
        _ => Err(err(format!(
            "{count} sockets passed (names: {}); name the vhost-user one \
             FileDescriptorName={ACTIVATED_NAME}",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        ))),
    }
}

/// Takes ownership of `fd` after checking that it is a listening unix
/// stream socket; marks it close-on-exec.
fn adopt(fd: RawFd) -> Result<UnixListener, String> {
    if fd < 0 {
        return Err("not a file descriptor".into());
    }
    // SAFETY: an all-zero stat is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes a stat into our buffer; an invalid fd only makes
    // it fail.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("not open ({})", io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("not a socket".into());
    }
    let opt = |name: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(format!("getsockopt: {}", io::Error::last_os_error()));
        }
        Ok(v)
    };
    if opt(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err("not a unix socket".into());
    }
    if opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket".into());
    }
    if opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err("not listening (call listen() on it before handing it over)".into());
    }
    // SAFETY: fd is an open descriptor; setting FD_CLOEXEC changes no memory.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(format!("fcntl: {}", io::Error::last_os_error()));
    }
    // SAFETY: fd is an open listening unix stream socket (checked above) that
    // nothing else in this process owns: it was handed to us.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// Creates the listening socket at `path` with `mode`: a stale socket file
/// is replaced, a live one (another daemon serving it) or any other file is
/// not.
pub(crate) fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<UnixListener, ListenError> {
    let err = |reason: String| ListenError::Path {
        path: path.into(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(err("another process is serving this socket".into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "replacing stale socket");
                std::fs::remove_file(path)
                    .map_err(|e| err(format!("removing stale socket: {e}")))?;
            }
            Err(e) => return Err(err(format!("checking existing socket: {e}"))),
        }
    }
    let gid = group
        .map(|g| lookup_group(g).ok_or_else(|| err(format!("unknown group '{g}'"))))
        .transpose()?;
    // Create it with no access for others, then open it up to `mode`, so it
    // is never reachable with wider permissions than asked for.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| err(format!("cannot bind: {e}")))?;
    // By name, but never through a symlink: whatever replaced the socket
    // in the folder since `bind` is not changed (a symlink fails).
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .map_err(|e| err(format!("cannot set group: {e}")))?;
    }
    chmod_nofollow(path, mode).map_err(|e| err(format!("cannot set mode: {e}")))?;
    Ok(listener)
}

/// `chmod` that fails on a symlink instead of following it.
fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: a NUL-terminated path and integer arguments.
    let rc = unsafe {
        libc::fchmodat(
            libc::AT_FDCWD,
            c.as_ptr(),
            mode as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The uid of a user named or numbered `u`.
pub fn lookup_user(u: &str) -> Option<u32> {
    if let Ok(uid) = u.parse() {
        return Some(uid);
    }
    let name = CString::new(u).ok()?;
    // SAFETY: getpwnam takes a NUL-terminated string and returns a pointer
    // to static storage or null; we read one field before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        None
    } else {
        // SAFETY: pw is non-null and points to a valid struct passwd.
        Some(unsafe { (*pw).pw_uid })
    }
}

/// The credentials of the process at the other end of a unix socket, as
/// the kernel recorded them at `connect` (`SO_PEERCRED`).
pub fn peer_credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// The id of a group named or numbered `g`.
fn lookup_group(g: &str) -> Option<u32> {
    if let Ok(gid) = g.parse() {
        return Some(gid);
    }
    let name = CString::new(g).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated string and returns a pointer to
    // static storage or null; we read one field before any other call.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        None
    } else {
        // SAFETY: gr is non-null and points to a valid struct group.
        Some(unsafe { (*gr).gr_gid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn adopt_takes_only_listening_unix_stream_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let fd = l.into_raw_fd();
        let l = adopt(fd).unwrap();
        // SAFETY: reading the flags of an open fd.
        let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);

        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(adopt(file.as_raw_fd()).unwrap_err(), "not a socket");
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(adopt(a.as_raw_fd()).unwrap_err().contains("not listening"));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(adopt(udp.as_raw_fd()).unwrap_err(), "not a unix socket");
        assert!(adopt(999_999).unwrap_err().starts_with("not open"));
    }
}
