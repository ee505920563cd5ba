//! `--cache none`: the image opened with O_DIRECT, as QEMU's `cache=none`.
//! The data path works for aligned and unaligned guest buffers, and the
//! host's page cache keeps no copy of the disk.

mod common;

use std::fs::File;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn direct_io_serves_aligned_and_unaligned_buffers_without_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 16 * MIB);
    let d = Daemon::start(
        dir.path(),
        "direct",
        &["--image", img.to_str().unwrap(), "--cache", "none"],
    );
    assert!(d.log_text().contains("direct I/O"), "{}", d.log_text());
    let mut f = Frontend::connect(&d.socket, 1, 4 * MIB as usize);

    // Aligned: libblkio's buffers are page-aligned.
    let data = pattern(1, MIB as usize);
    f.buf(0, MIB as usize).copy_from_slice(&data);
    assert_eq!(f.write(0, MIB, 0, MIB as usize), 0);
    assert_eq!(f.read(0, MIB, 2 * MIB as usize, MIB as usize), 0);
    assert_eq!(f.buf(2 * MIB as usize, MIB as usize), &data[..]);

    // Unaligned: segments at odd addresses with odd lengths (a sector split
    // across three of them) still succeed, through the bounce buffer.
    let odd = pattern(2, 8192);
    f.buf(1, 8192).copy_from_slice(&odd);
    let iov = |base: *mut u8, len| libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    };
    let w = [
        iov(f.ptr(1), 100),
        iov(f.ptr(101), 700),
        iov(f.ptr(801), 8192 - 800),
    ];
    f.queues[0].writev(4 * MIB, w.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    let r = [
        iov(f.ptr(MIB as usize + 3), 5000),
        iov(f.ptr(MIB as usize + 6003), 3192),
    ];
    f.queues[0].readv(4 * MIB, r.as_ptr(), 2, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.buf(MIB as usize + 3, 5000), &odd[..5000]);
    assert_eq!(f.buf(MIB as usize + 6003, 3192), &odd[5000..]);

    // Flush, write-zeroes and discard.
    assert_eq!(f.flush(0), 0);
    f.queues[0].write_zeroes(MIB + 4096, 8192, 0, ReqFlags::NO_UNMAP);
    assert_eq!(f.wait(0), 0);
    f.queues[0].discard(MIB + 65536, 65536, 0, ReqFlags::empty());
    assert_eq!(f.wait(0), 0);
    assert_eq!(f.read(0, MIB, 0, 131072), 0);
    let back = f.buf(0, 131072).to_vec();
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&back[12288..65536], &data[12288..65536]);
    assert!(back[65536..].iter().all(|&b| b == 0));

    // The host's page cache holds none of what the guest wrote or read (the
    // first pages are read at start, through the ordinary descriptor, to
    // check the image's format).
    let file = File::open(&img).unwrap();
    if let Some(pages) = cachestat(&file, MIB).map(|st| st.cache) {
        assert_eq!(pages, 0, "pages of the image in the page cache");
    }
    drop(f);
    assert!(d.terminate().success());
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(
        &on_disk[4 * MIB as usize..4 * MIB as usize + 8192],
        &odd[..]
    );
}

#[test]
fn a_bad_cache_mode_is_refused_naming_the_modes() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(dir.path(), 16 * MIB);
    let out = std::process::Command::new(bin())
        .args(["serve", "--cache", "bogus", "--image"])
        .arg(&img)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("writeback") && err.contains("none"), "{err}");
}
