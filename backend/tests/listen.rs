//! A listening socket handed to vmcrypt instead of a path it binds:
//! `--socket-fd` (as qemu-storage-daemon's `addr.type=fd`, which QEMU's own
//! vhost-user-blk tests use) and systemd socket activation.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, pattern, sparse_image, Frontend};

const MIB: u64 = 1 << 20;

/// Spawns `cmd` with each `(fd, target)` pair dup2'ed to `target`.
fn spawn_with_fds(mut cmd: Command, fds: &[(RawFd, RawFd)], log: &Path) -> Child {
    assert!(fds.len() <= 8);
    let fds = fds.to_vec();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: between fork and exec only fcntl and dup2 run, which are
    // async-signal-safe, on a fixed array (at most 8 descriptors).
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may sit on another's target),
            // then into place; dup2 leaves the target without close-on-exec.
            let mut high = [0; 8];
            for (i, &(from, _)) in fds.iter().enumerate() {
                high[i] = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &(_, to)) in fds.iter().enumerate() {
                if libc::dup2(high[i], to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn wait_for_log(child: &mut Child, log: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = std::fs::read_to_string(log).unwrap_or_default();
        if t.contains(text) {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("vmcrypt exited with {s}: {t}");
        }
        assert!(Instant::now() < deadline, "no '{text}' in:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn terminate(mut child: Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "vmcrypt did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes and reads back through `socket`; checks the image file.
fn write_read(socket: &Path, img: &Path, seed: u64) {
    let mut f = Frontend::connect(socket, 1, 2 * MIB as usize);
    let data = pattern(seed, 8192);
    f.buf(0, 8192).copy_from_slice(&data);
    assert_eq!(f.write(0, MIB, 0, 8192), 0);
    assert_eq!(f.read(0, MIB, MIB as usize, 8192), 0);
    assert_eq!(f.buf(MIB as usize, 8192), &data[..]);
    drop(f);
    let on_disk = std::fs::read(img).unwrap();
    assert_eq!(&on_disk[MIB as usize..MIB as usize + 8192], &data[..]);
}

#[test]
fn a_socket_handed_in_as_an_fd_is_served_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 16 * MIB);
    let sock = dir.path().join("handed.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let log = dir.path().join("fd.log");
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--num-queues", "1", "--socket-fd", "7", "--image"])
        .arg(&img);
    let mut child = spawn_with_fds(cmd, &[(listener.as_raw_fd(), 7)], &log);
    wait_for_log(&mut child, &log, "waiting for a frontend");
    assert!(std::fs::read_to_string(&log).unwrap().contains("fd 7"));
    write_read(&sock, &img, 1);
    // Reconnecting works on the same handed-in socket.
    write_read(&sock, &img, 2);
    assert!(terminate(child).success());
    // The socket belongs to whoever made it: vmcrypt leaves the file.
    assert!(sock.exists());
}

#[test]
fn systemd_socket_activation_picks_the_named_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 16 * MIB);
    let other = UnixListener::bind(dir.path().join("control.sock")).unwrap();
    let sock = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let log = dir.path().join("sd.log");
    // As systemd passes them: fds from 3, LISTEN_PID the service's own pid
    // (the shell's $$, which exec keeps).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" serve --num-queues 1 --image "$1""#)
        .arg(bin())
        .arg(&img)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "control:vhost-user");
    let mut child = spawn_with_fds(
        cmd,
        &[(other.as_raw_fd(), 3), (listener.as_raw_fd(), 4)],
        &log,
    );
    wait_for_log(&mut child, &log, "waiting for a frontend");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("systemd-passed fd 4"));
    write_read(&sock, &img, 3);
    assert!(terminate(child).success());
}

#[test]
fn what_is_not_a_listening_unix_socket_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 16 * MIB);
    let file = std::fs::File::create(dir.path().join("plain")).unwrap();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let spare = UnixListener::bind(dir.path().join("x.sock")).unwrap();
    // (shell variables, serve arguments, descriptors, expected message)
    struct Case {
        env: &'static str,
        args: &'static str,
        fds: Vec<(RawFd, RawFd)>,
        want: &'static str,
    }
    let cases = [
        Case {
            env: "",
            args: "--socket-fd 5",
            fds: vec![(file.as_raw_fd(), 5)],
            want: "--socket-fd 5: not a socket",
        },
        Case {
            env: "",
            args: "--socket-fd 5",
            fds: vec![(a.as_raw_fd(), 5)],
            want: "not listening",
        },
        Case {
            env: "",
            args: "--socket-fd 9",
            fds: vec![],
            want: "--socket-fd 9: not open",
        },
        Case {
            env: "LISTEN_FDS=1 LISTEN_PID=1",
            args: "",
            fds: vec![(spare.as_raw_fd(), 3)],
            want: "not this process",
        },
        Case {
            env: "LISTEN_FDS=2 LISTEN_PID=$$",
            args: "",
            fds: vec![(spare.as_raw_fd(), 3), (spare.as_raw_fd(), 4)],
            want: "FileDescriptorName=vhost-user",
        },
    ];
    for case in cases {
        let log = dir.path().join("err.log");
        let script = format!(r#"{} exec "$0" serve --image "$1" {}"#, case.env, case.args);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg(bin()).arg(&img);
        let mut child = spawn_with_fds(cmd, &case.fds, &log);
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let want = case.want;
        assert!(!status.success(), "{want}: {text}");
        assert!(text.contains(want), "wanted '{want}' in: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{text}");
    }
}

/// `Type=notify`: READY=1 reaches the NOTIFY_SOCKET listener once the
/// socket serves (a path socket and an abstract one), STOPPING=1 when
/// SIGTERM comes.
#[test]
fn ready_and_stopping_are_sent_to_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 8 * MIB);
    let abstract_name = format!("vmcrypt-test-{}", std::process::id());
    let path_listener = dir.path().join("notify");
    for (addr_env, listener) in [
        (
            path_listener.to_str().unwrap().to_string(),
            UnixDatagram::bind(&path_listener).unwrap(),
        ),
        (
            format!("@{abstract_name}"),
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap(),
        ),
    ] {
        listener
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let socket = dir.path().join("s.sock");
        let log = dir.path().join("notify.log");
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--image", img.to_str().unwrap(), "--socket"])
            .arg(&socket)
            .env("NOTIFY_SOCKET", &addr_env);
        let mut child = spawn_with_fds(cmd, &[], &log);
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).expect("READY=1 within 20 s");
        assert_eq!(&buf[..n], b"READY=1", "{addr_env}");
        // Ready means serving: the socket answers at once.
        write_read(&socket, &img, 3);
        wait_for_log(&mut child, &log, "frontend disconnected");
        assert!(terminate(child).success());
        let n = listener.recv(&mut buf).expect("STOPPING=1");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
