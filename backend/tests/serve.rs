//! `vmcrypt serve` driven as QEMU would drive it, with libblkio as the
//! vhost-user-blk frontend.

mod common;

use std::process::Command;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::*;

const MIB: u64 = 1 << 20;

fn serve_raw(dir: &std::path::Path, size: u64, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let img = sparse_image(dir, size);
    let mut args = vec!["--image", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Daemon::start(dir, "vmcrypt", &args), img)
}

#[test]
fn write_then_read_back_with_multi_segment_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img) = serve_raw(dir.path(), 16 * MIB, &[]);
    let mut f = Frontend::connect(&d.socket, 1, 4 * MIB as usize);
    assert_eq!(f.capacity, 16 * MIB);

    // A writev of three segments of different sizes, a readv of two.
    let data = pattern(7, 12288);
    f.buf(0, 12288).copy_from_slice(&data);
    let iov = |base: *mut u8, len| libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    };
    let w = [
        iov(f.ptr(0), 512),
        iov(f.ptr(512), 7680),
        iov(f.ptr(8192), 4096),
    ];
    f.queues[0].writev(MIB, w.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    let r = [
        iov(f.ptr(MIB as usize), 4096),
        iov(f.ptr(2 * MIB as usize), 8192),
    ];
    f.queues[0].readv(MIB, r.as_ptr(), 2, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.buf(MIB as usize, 4096), &data[..4096]);
    assert_eq!(f.buf(2 * MIB as usize, 8192), &data[4096..]);
    drop(f);

    // The image holds the data at the same offset.
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[MIB as usize..MIB as usize + 12288], &data[..]);
}

#[test]
fn first_and_last_sector() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let (d, _) = serve_raw(dir.path(), size, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    for (seed, off) in [(1, 0), (2, size - 512)] {
        f.buf(0, 512).copy_from_slice(&pattern(seed, 512));
        assert_eq!(f.write(0, off, 0, 512), 0);
        f.buf(4096, 512).fill(0);
        assert_eq!(f.read(0, off, 4096, 512), 0);
        assert_eq!(f.buf(4096, 512), &pattern(seed, 512)[..]);
    }
}

#[test]
fn flush_discard_and_write_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img) = serve_raw(dir.path(), 8 * MIB, &[]);
    let mut f = Frontend::connect(&d.socket, 1, 2 * MIB as usize);
    f.buf(0, MIB as usize)
        .copy_from_slice(&pattern(3, MIB as usize));
    assert_eq!(f.write(0, 0, 0, MIB as usize), 0);
    assert_eq!(f.write(0, 2 * MIB, 0, MIB as usize), 0);
    assert_eq!(f.flush(0), 0);

    // Write-zeroes (plain and with UNMAP) reads back zeroes.
    f.queues[0].write_zeroes(4096, 65536, 0, ReqFlags::NO_UNMAP);
    assert_eq!(f.wait(0), 0);
    f.queues[0].write_zeroes(2 * MIB + 8192, 16384, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.read(0, 0, MIB as usize, 128 << 10), 0);
    let back = f.buf(MIB as usize, 128 << 10).to_vec();
    let orig = pattern(3, MIB as usize);
    assert_eq!(&back[..4096], &orig[..4096]);
    assert!(back[4096..4096 + 65536].iter().all(|&b| b == 0));
    assert_eq!(&back[69632..], &orig[69632..128 << 10]);
    assert_eq!(f.read(0, 2 * MIB + 8192, MIB as usize, 16384), 0);
    assert!(f.buf(MIB as usize, 16384).iter().all(|&b| b == 0));

    // Discard punches a hole: a raw image reads zeroes there, and frees space.
    let blocks_before = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .unwrap();
    f.queues[0].discard(0, MIB, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.read(0, 0, 0, 4096), 0);
    assert!(f.buf(0, 4096).iter().all(|&b| b == 0));
    let blocks_after = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .unwrap();
    assert!(
        blocks_after < blocks_before,
        "{blocks_after} < {blocks_before}"
    );
}

#[test]
fn read_only_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 4 * MIB);
    std::fs::write(&img, pattern(9, 4 * MIB as usize)).unwrap();
    let d = Daemon::start(
        dir.path(),
        "ro",
        &["--image", img.to_str().unwrap(), "--read-only"],
    );
    // A frontend that does not accept read-only cannot start on this disk.
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", d.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    assert!(b.start().is_err(), "RO feature not offered");
    drop(b);
    let mut f = Frontend::connect_with(&d.socket, 1, MIB as usize, true);
    assert!(f.write(0, 0, 0, 4096) < 0);
    f.queues[0].discard(0, 4096, 0, ReqFlags::empty());
    assert!(f.wait(0) < 0);
    assert_eq!(f.read(0, 0, 0, 4096), 0);
    assert_eq!(f.buf(0, 4096), &pattern(9, 4 * MIB as usize)[..4096]);
    assert_eq!(f.flush(0), 0);
    drop(f);
    assert_eq!(std::fs::read(&img).unwrap(), pattern(9, 4 * MIB as usize));
}

#[test]
fn bad_requests_get_errors_and_the_daemon_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let (d, img) = serve_raw(dir.path(), size, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 8192).copy_from_slice(&pattern(5, 8192));
    // Beyond the end, straddling the end, far beyond (sector overflow).
    assert!(f.read(0, size, 0, 512) < 0);
    assert!(f.write(0, size - 512, 0, 1024) < 0);
    assert!(f.read(0, u64::MAX - 511, 0, 512) < 0);
    // Length not a multiple of 512.
    assert!(f.write(0, 0, 0, 100) < 0);
    assert!(f.read(0, 0, 0, 700) < 0);
    // Ranges past the end.
    f.queues[0].discard(size - 4096, 8192, 0, ReqFlags::empty());
    assert!(f.wait(0) < 0);
    f.queues[0].write_zeroes(size, 4096, 0, ReqFlags::empty());
    assert!(f.wait(0) < 0);
    // Nothing was written, and the daemon still serves.
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    assert_eq!(f.write(0, 0, 0, 8192), 0);
    assert_eq!(f.read(0, 0, 16384, 8192), 0);
    assert_eq!(f.buf(16384, 8192), &pattern(5, 8192)[..]);
}

#[test]
fn two_queues_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = serve_raw(dir.path(), 64 * MIB, &["--num-queues", "2"]);
    let f = Frontend::connect(&d.socket, 2, 4 * MIB as usize);
    assert_eq!(f.queues.len(), 2);
    let Frontend {
        blkio,
        queues,
        region,
        ..
    } = f;
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let base = region.addr + qi * 2 * MIB as usize;
            std::thread::spawn(move || {
                // Each queue writes and reads back its own 32 MiB half, 64 KiB at a time.
                let buf = base as *mut u8;
                let chunk = 64 << 10;
                for i in 0..64u64 {
                    let off = qi as u64 * 32 * MIB + i * chunk as u64;
                    let data = pattern(off, chunk);
                    // SAFETY: each thread uses its own 2 MiB of the mapped region.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, chunk) };
                    q.write(off, buf, chunk, 0, ReqFlags::empty());
                    assert_eq!(wait_one(&mut q), 0);
                    // SAFETY: as above, the second MiB of this thread's area.
                    let rbuf = unsafe { buf.add(MIB as usize) };
                    q.read(off, rbuf, chunk, 0, ReqFlags::empty());
                    assert_eq!(wait_one(&mut q), 0);
                    // SAFETY: as above.
                    let back = unsafe { std::slice::from_raw_parts(rbuf, chunk) };
                    assert_eq!(back, &data[..], "queue {qi} offset {off}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop(blkio);
}

fn wait_one(q: &mut blkio::Blkioq) -> i32 {
    let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
    let mut t = Duration::from_secs(30);
    assert_eq!(q.do_io(&mut c, 1, Some(&mut t), None).unwrap(), 1);
    // SAFETY: do_io initialised one completion.
    unsafe { c[0].assume_init_read() }.ret
}

#[test]
fn reconnect_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = serve_raw(dir.path(), 8 * MIB, &["--num-queues", "2"]);
    for round in 0..3u64 {
        let mut f = Frontend::connect(&d.socket, 2, MIB as usize);
        if round > 0 {
            assert_eq!(f.read(1, (round - 1) * 65536, 0, 65536), 0);
            assert_eq!(
                f.buf(0, 65536),
                &pattern(round - 1, 65536)[..],
                "round {round}"
            );
        }
        f.buf(0, 65536).copy_from_slice(&pattern(round, 65536));
        assert_eq!(f.write(0, round * 65536, 0, 65536), 0);
        drop(f);
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = d.log_text();
    assert_eq!(log.matches("frontend connected").count(), 3, "{log}");
    eprintln!("{log}");
}

/// SIGTERM with writes in flight: every write vmcrypt has taken completes
/// (none is dropped), and a restarted daemon finds each chunk holding the
/// last write to it. Every write carries data of its own, so a write
/// reported done but not written, or lost at exit, shows as old data.
#[test]
fn sigterm_completes_writes_in_flight_and_restart_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 64 * MIB);
    let img_arg = img.to_str().unwrap();
    // The throttle holds writes inside vmcrypt: when SIGTERM comes, all
    // those in flight have been taken and wait there.
    let d = Daemon::start(
        dir.path(),
        "a",
        &[
            "--image",
            img_arg,
            "--filter",
            "throttle:write_iops_sec=200",
        ],
    );
    let mut f = Frontend::connect(&d.socket, 1, 8 * MIB as usize);
    let chunk = 64 << 10;
    let slots = 32usize;
    let chunks = 96u64;
    let mut last_write = vec![None::<u64>; chunks as usize];
    let mut next = 0u64;
    let mut in_flight = 0;
    let mut signalled = false;
    let mut after_signal = 0;
    let mut comps: Vec<std::mem::MaybeUninit<Completion>> =
        (0..64).map(|_| std::mem::MaybeUninit::uninit()).collect();
    let mut free: Vec<usize> = (0..slots).collect();
    loop {
        if !signalled {
            while let Some(slot) = free.pop() {
                f.buf(slot * chunk, chunk)
                    .copy_from_slice(&pattern(1000 + next, chunk));
                let p = f.ptr(slot * chunk);
                // user_data: write number and slot.
                f.queues[0].write(
                    (next % chunks) * chunk as u64,
                    p,
                    chunk,
                    (next as usize) << 8 | slot,
                    ReqFlags::empty(),
                );
                next += 1;
                in_flight += 1;
            }
            // Two passes over the chunks, then SIGTERM with all slots in
            // flight, once vmcrypt has had time to take them.
            if next > 2 * chunks {
                // libblkio only queues the writes above; publish them
                // before the signal (no completion taken here).
                f.queues[0].do_io(&mut [], 0, None, None).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                d.signal(libc::SIGTERM);
                signalled = true;
            }
        }
        let mut t = Duration::from_millis(2000);
        let n = f.queues[0]
            .do_io(&mut comps, 1, Some(&mut t), None)
            .unwrap_or(0);
        if n == 0 {
            assert!(signalled, "writes stalled before SIGTERM");
            break;
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0);
            let (w, slot) = ((c.user_data >> 8) as u64, c.user_data & 0xff);
            let last = &mut last_write[(w % chunks) as usize];
            *last = Some(last.map_or(w, |l: u64| l.max(w)));
            free.push(slot);
            in_flight -= 1;
            after_signal += usize::from(signalled);
        }
        if signalled && in_flight == 0 {
            break;
        }
    }
    drop(f);
    let log = d.log_text();
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(log.contains("shutting down"), "{log}");
    assert_eq!(
        in_flight, 0,
        "{in_flight} writes in flight at SIGTERM never completed ({after_signal} did)"
    );
    assert_eq!(after_signal, slots, "writes completed after SIGTERM");

    // Restart: every chunk holds its last write.
    let d = Daemon::start(dir.path(), "b", &["--image", img_arg]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    for (i, w) in last_write.iter().enumerate() {
        let w = w.expect("every chunk written");
        assert_eq!(f.read(0, i as u64 * chunk as u64, 0, chunk), 0);
        assert!(
            f.buf(0, chunk) == &pattern(1000 + w, chunk)[..],
            "chunk {i} does not hold write {w}"
        );
    }
}

#[test]
fn throttle_holds_the_iops_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 400.0;
    let (d, _) = serve_raw(
        dir.path(),
        16 * MIB,
        &[
            "--filter",
            "throttle:total_iops_sec=400",
            "--filter",
            "stats",
        ],
    );
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    // Warm up past the initial burst, then measure with 8 requests in flight.
    read_iops(&mut f, Duration::from_millis(500));
    let iops = read_iops(&mut f, Duration::from_secs(3));
    eprintln!("throttled IOPS: {iops:.0} (limit {limit})");
    assert!(
        (iops - limit).abs() <= limit * 0.1,
        "IOPS {iops:.0} not within 10% of {limit}"
    );
    // SIGUSR1 logs the stats: a line with the read count (the start-up
    // line names the filter too, so look for the counters).
    d.signal(libc::SIGUSR1);
    d.wait_for_log("op=\"read\"");
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(" stats ") && l.contains("op=\"read\""))
        .unwrap_or_else(|| panic!("no stats line for reads in:\n{log}"));
    assert!(
        line.contains("count=") && line.contains("p99_us_below="),
        "{line}"
    );
}

#[test]
fn null_device_reads_zeroes_and_drops_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "null", &["--image", "null:1G"]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, 1 << 30);
    f.buf(0, 4096).fill(0xaa);
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    assert_eq!(f.read(0, 0, 0, 4096), 0);
    assert!(f.buf(0, 4096).iter().all(|&b| b == 0));
}

#[test]
fn socket_is_private_and_stale_sockets_are_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vmcrypt.sock");
    // A stale socket (bound, then its owner went away).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let d = Daemon::start(dir.path(), "vmcrypt", &["--image", "null:1M"]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon on the same live socket is refused.
    let out = Command::new(bin())
        .args(["serve", "--image", "null:1M", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process is serving"), "{err}");
    // The first one still serves.
    let f = Frontend::connect(&d.socket, 1, MIB as usize);
    assert_eq!(f.capacity, MIB);
}

#[test]
fn socket_mode_and_config_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("serve.toml");
    std::fs::write(
        &conf,
        "image = \"null:2M\"\nsocket-mode = \"0660\"\nnum-queues = 2\n",
    )
    .unwrap();
    let d = Daemon::start(
        dir.path(),
        "cfg",
        &["--config", conf.to_str().unwrap(), "--num-queues", "3"],
    );
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let f = Frontend::connect(&d.socket, 3, MIB as usize);
    assert_eq!(f.capacity, 2 * MIB);
    assert_eq!(f.queues.len(), 3);
}

#[test]
fn start_up_errors_are_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let plain = dir.path().join("plain-file");
    std::fs::write(&plain, b"not a socket").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--image".into(),
                dir.path().join("missing.img").display().to_string(),
                "--socket".into(),
                sock.display().to_string(),
            ],
            "cannot open image",
        ),
        (
            vec![
                "--image".into(),
                odd.display().to_string(),
                "--socket".into(),
                sock.display().to_string(),
            ],
            "not a multiple of the block size",
        ),
        (
            vec![
                "--image".into(),
                "null:1M".into(),
                "--socket".into(),
                "/nonexistent-dir/s.sock".into(),
            ],
            "cannot bind",
        ),
        (
            vec![
                "--image".into(),
                "null:1M".into(),
                "--socket".into(),
                plain.display().to_string(),
            ],
            "not a socket",
        ),
        (
            vec![
                "--image".into(),
                "null:1M".into(),
                "--socket".into(),
                sock.display().to_string(),
                "--filter".into(),
                "bogus".into(),
            ],
            "unknown filter",
        ),
        (
            vec!["--socket".into(), sock.display().to_string()],
            "missing --image",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(bin())
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&plain).unwrap(), b"not a socket");
}

#[test]
fn image_is_held_by_the_running_device_only() {
    // Two daemons may hold one image open (a migration's source and
    // destination); only the one whose device runs may use it.
    let dir = tempfile::tempdir().unwrap();
    let (d, img) = serve_raw(dir.path(), MIB, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(3, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    assert_eq!(f.flush(0), 0);
    let before = std::fs::read(&img).unwrap();

    // The second daemon starts and waits; its device start is refused.
    let d2 = Daemon::start(dir.path(), "second", &["--image", img.to_str().unwrap()]);
    let refused = try_start(&d2.socket);
    assert!(refused.is_err(), "second device started beside the first");
    assert!(
        d2.log_text()
            .contains("another vmcrypt runs a device on it"),
        "{}",
        d2.log_text()
    );
    assert!(std::fs::read(&img).unwrap() == before, "image changed");
    // The first device is undisturbed.
    assert_eq!(f.read(0, 0, 8192, 4096), 0);
    assert_eq!(f.buf(8192, 4096), &pattern(3, 4096)[..]);

    // Once the first device stops (its frontend goes away), the second
    // takes over and reads what the first wrote.
    drop(f);
    d.wait_for_log("lock released");
    drop(refused);
    let mut g = Frontend::connect(&d2.socket, 1, MIB as usize);
    assert_eq!(g.read(0, 0, 0, 4096), 0);
    assert_eq!(g.buf(0, 4096), &pattern(3, 4096)[..]);
    // And now the first one is refused in turn.
    assert!(try_start(&d.socket).is_err());
}

#[test]
fn guest_memory_added_while_running_is_used() {
    // libblkio maps more buffer regions after the device started: the
    // frontend sends memory table updates (hotplug) while the queue thread
    // is busy, even polling, and the next requests point into the new regions.
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = serve_raw(dir.path(), 8 * MIB, &[]);
    let mut f = Frontend::connect(&d.socket, 1, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(21, 4096));
    assert_eq!(f.write(0, 0, 0, 4096), 0);
    let mut regions = Vec::new();
    for round in 0..8u64 {
        // I/O on the old region right before, so the queue thread polls.
        assert_eq!(f.read(0, 0, 8192, 4096), 0);
        let extra = f.blkio.alloc_mem_region(2 * MIB as usize).unwrap();
        f.blkio.map_mem_region(&extra).unwrap();
        let p = extra.addr as *mut u8;
        f.queues[0].read(0, p, 4096, 0, ReqFlags::empty());
        assert_eq!(f.wait(0), 0, "round {round}: read into a new region");
        // SAFETY: the region is 2 MiB, mapped read-write for us.
        let got = unsafe { std::slice::from_raw_parts(p, 4096) };
        assert_eq!(got, &pattern(21, 4096)[..]);
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(pattern(round, 4096).as_ptr(), p.add(8192), 4096) };
        // SAFETY: as above.
        f.queues[0].write(
            MIB + round * 4096,
            unsafe { p.add(8192) },
            4096,
            0,
            ReqFlags::empty(),
        );
        assert_eq!(f.wait(0), 0, "round {round}: write from a new region");
        regions.push(extra);
    }
    // The first region still works, and holds what the others wrote.
    for round in 0..8u64 {
        assert_eq!(f.read(0, MIB + round * 4096, 65536, 4096), 0);
        assert_eq!(f.buf(65536, 4096), &pattern(round, 4096)[..]);
    }
    for r in &regions {
        f.blkio.unmap_mem_region(r);
    }
    assert_eq!(f.read(0, 0, 0, 4096), 0);
}

/// `Seccomp:` of every thread of `pid` (0 none, 2 filter), from /proc.
fn seccomp_modes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim().to_string())
                .unwrap()
        })
        .collect()
}

#[test]
fn every_thread_serves_under_the_seccomp_filter() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = serve_raw(dir.path(), 8 * MIB, &["--num-queues", "2"]);
    let mut f = Frontend::connect(&d.socket, 2, MIB as usize);
    f.buf(0, 4096).copy_from_slice(&pattern(9, 4096));
    for q in 0..2 {
        assert_eq!(f.write(q, 4096 * q as u64, 0, 4096), 0);
        assert_eq!(f.flush(q), 0);
        assert_eq!(f.read(q, 4096 * q as u64, 8192, 4096), 0);
    }
    d.wait_for_log("seccomp filter installed");
    // The main thread, the signal thread, the frontend's thread and one
    // per queue: all filtered.
    let modes = seccomp_modes(d.child.id());
    assert!(modes.len() >= 5, "threads: {modes:?}");
    assert!(modes.iter().all(|m| m == "2"), "Seccomp: {modes:?}");
    drop(f);
    assert!(d.terminate().success());

    let (d, _) = serve_raw(dir.path(), 8 * MIB, &["--seccomp", "off"]);
    assert!(seccomp_modes(d.child.id()).iter().all(|m| m == "0"));
    assert!(!d.log_text().contains("seccomp filter installed"));
}
