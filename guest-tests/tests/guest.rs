//! Guests on vmcrypt disks: QEMU boots a small Linux guest whose disk is a
//! vhost-user-blk socket served by `vmcrypt serve`, and fio runs inside.
//!
//! Run one case alone with `cargo test -p guest-tests -- CASE`.

use std::path::Path;
use std::sync::Mutex;

use guest_tests::vm::{fio_errors, fio_summary};
use guest_tests::{Accel, Disk, GuestImage, Vm, Vmcrypt};

/// Guests run one at a time: the machine has two cores.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn setup() -> (GuestImage, Accel, std::sync::MutexGuard<'static, ()>) {
    let lock = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::prepare().expect("prepare guest");
    let accel = Accel::detect(&image);
    eprintln!("guest accelerator: {accel:?}");
    (image, accel, lock)
}

fn raw_image(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// fio with crc32c verification: random writes of mixed sizes, 2 jobs
/// (so both queues are used), then a verify pass.
const FIO_VERIFY: &str = r#"
echo "disk: $(cat /sys/block/vda/size) sectors, $(cat /sys/block/vda/mq/*/nr_tags 2>/dev/null | wc -l) queues, ro=$(cat /sys/block/vda/ro)"
echo "=== BEGIN size"; cat /sys/block/vda/size; echo "=== END size"
echo "=== BEGIN fio"
fio --output-format=json --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=randwrite --bsrange=4k-128k --size=48M --offset_increment=64M \
    --numjobs=2 --verify=crc32c --do_verify=1 --verify_fatal=1 --random_generator=tausworthe64
rc=$?
echo "=== END fio"
exit $rc
"#;

#[test]
fn raw_disk_boots_and_fio_verify_passes() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let img = raw_image(work.path(), "disk.img", 256 << 20);
    let d = Vmcrypt::start(
        work.path(),
        "vmcrypt",
        &["--image", img.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let run = vm
        .run(FIO_VERIFY, work.path())
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    eprintln!("guest ran {:.1} s", run.seconds);
    assert_eq!(
        run.section("size").as_deref(),
        Some("524288"),
        "{}",
        run.tail()
    );
    let fio = run.fio("fio").unwrap();
    eprint!("{}", fio_summary(&fio));
    assert_eq!(run.rc, Some(0), "{}", run.tail());
    assert_eq!(fio_errors(&fio), 0);
    assert!(d.stop().success());
}

/// `vmcrypt create` an encrypted image in `dir` with a local key store.
fn encrypted_image(dir: &Path, name: &str, size: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    let out = std::process::Command::new(guest_tests::vmcrypt::binary())
        .args([
            "create",
            img.to_str().unwrap(),
            "--size",
            size,
            "--keystore",
        ])
        .arg(dir.join("keys"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

#[test]
fn encrypted_disk_boots_and_fio_verify_passes() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let img = encrypted_image(work.path(), "disk.img", "256M");
    let d = Vmcrypt::start(
        work.path(),
        "vmcrypt",
        &["--image", img.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let run = vm
        .run(FIO_VERIFY, work.path())
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    assert_eq!(
        run.section("size").as_deref(),
        Some("524288"),
        "{}",
        run.tail()
    );
    let fio = run.fio("fio").unwrap();
    eprint!("{}", fio_summary(&fio));
    assert_eq!(run.rc, Some(0), "{}", run.tail());
    assert_eq!(fio_errors(&fio), 0);
    assert!(d.stop().success());
}
