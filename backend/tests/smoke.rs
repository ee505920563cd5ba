mod common;
use common::*;

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let d = Daemon::start(dir.path(), "d", &["--image", img.to_str().unwrap()]);
    let mut f = Frontend::connect(&d.socket, 1, 1 << 20);
    assert_eq!(f.capacity, 8 << 20);
    let p = pattern(1, 8192);
    f.buf(0, 8192).copy_from_slice(&p);
    assert_eq!(f.write(0, 4096, 0, 8192), 0);
    assert_eq!(f.read(0, 4096, 65536, 8192), 0);
    assert_eq!(f.buf(65536, 8192), &p[..]);
    drop(f);
    eprintln!("{}", d.log_text());
}
