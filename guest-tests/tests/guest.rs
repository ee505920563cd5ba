//! Guests on vmcrypt disks: QEMU boots a small Linux guest whose disk is a
//! vhost-user-blk socket served by `vmcrypt serve`, and fio runs inside.
//!
//! Run one case alone with `cargo test -p guest-tests -- CASE`.

use std::path::Path;

use guest_tests::vm::{fio_errors, fio_summary};
use guest_tests::{Disk, Vm, Vmcrypt};

use guest_tests::one_guest as setup;

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
    let (_img, d) = start_raw(work.path(), 256 << 20);
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
    expect_fio_verify(&run, &d);
    assert!(d.stop().success());
}

/// A driver that does not negotiate VIRTIO_RING_F_EVENT_IDX (QEMU
/// `event_idx=off`) relies on the used ring's NO_NOTIFY flag: a request it
/// publishes while the flag is set gets no kick, and vmcrypt must see it
/// when it turns notifications back on. QD1 synchronous I/O on two queues
/// hits that window often; it used to stall the guest.
#[test]
fn a_driver_without_event_idx_is_served() {
    const FIO_QD1: &str = r#"
echo "=== BEGIN fio"
fio --output-format=json --name=verify --filename=/dev/vda --direct=1 --ioengine=psync \
    --rw=randwrite --bs=4k --size=4M --offset_increment=64M \
    --numjobs=2 --verify=crc32c --do_verify=1 --verify_fatal=1 --random_generator=tausworthe64
rc=$?
echo "=== END fio"
exit $rc
"#;
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let (_img, d) = start_raw(work.path(), 256 << 20);
    let mut vm = Vm::new(&image, accel);
    let mut disk = Disk::new(&d.socket);
    disk.device_opts = ",event_idx=off".into();
    vm.disks.push(disk);
    vm.timeout = std::time::Duration::from_secs(150);
    let run = vm
        .run(FIO_QD1, work.path())
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    eprintln!("guest ran {:.1} s", run.seconds);
    expect_fio_verify(&run, &d);
    assert!(d.stop().success());
}

/// `vmcrypt create` an encrypted image in `dir` with a local key store.
fn encrypted_image(dir: &Path, name: &str, size: &str) -> std::path::PathBuf {
    guest_tests::vmcrypt::create_encrypted(dir, name, size).unwrap()
}

#[test]
fn encrypted_disk_boots_and_fio_verify_passes() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let (_img, d) = start_encrypted(work.path(), "256M", &[]);
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
    expect_fio_verify(&run, &d);
    let log = d.log.clone();
    assert!(d.stop().success());
    // fio's verify reads (up to 128 KiB) of what it just wrote came
    // decrypted straight from the page cache.
    let log = std::fs::read_to_string(log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("reads decrypted straight from the page cache"))
        .unwrap_or_else(|| panic!("no report in:\n{log}"));
    assert!(!line.contains("reads=0 "), "{line}");
}

/// `--cache none` (O_DIRECT, QEMU's cache=none) on an encrypted disk.
#[test]
fn encrypted_disk_with_cache_none_passes_fio_verify() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let (_img, d) = start_encrypted(work.path(), "256M", &["--cache", "none"]);
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let run = vm
        .run(FIO_VERIFY, work.path())
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    expect_fio_verify(&run, &d);
    assert!(d.log_text().contains("direct I/O"));
    assert!(d.stop().success());
}

/// vmcrypt with two queues on a fresh sparse raw `disk.img` of `size` bytes.
fn start_raw(work: &Path, size: u64) -> (std::path::PathBuf, Vmcrypt) {
    let img = raw_image(work, "disk.img", size);
    let d = Vmcrypt::start(
        work,
        "vmcrypt",
        &["--image", img.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    (img, d)
}

fn start_encrypted(work: &Path, size: &str, extra: &[&str]) -> (std::path::PathBuf, Vmcrypt) {
    let img = encrypted_image(work, "disk.img", size);
    let mut args = vec!["--image", img.to_str().unwrap(), "--num-queues", "2"];
    args.extend_from_slice(extra);
    let d = Vmcrypt::start(work, "vmcrypt", &args).unwrap();
    (img, d)
}

/// The guest script passed and fio (section "fio") verified without errors.
fn expect_fio_verify(run: &guest_tests::GuestRun, d: &Vmcrypt) {
    let fio = run.fio("fio").unwrap();
    eprint!("{}", fio_summary(&fio));
    check(run, d);
    assert_eq!(fio_errors(&fio), 0);
}

fn check(run: &guest_tests::GuestRun, d: &Vmcrypt) {
    assert_eq!(
        run.rc,
        Some(0),
        "guest script failed:\n{}\nvmcrypt log:\n{}",
        run.tail(),
        d.log_text()
    );
}

#[test]
fn persistence_ext4_across_a_vmcrypt_restart() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let (img, d) = start_encrypted(work.path(), "256M", &[]);
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let write = r#"
mkfs.ext4 -q -F /dev/vda || exit 10
mount -t ext4 /dev/vda /mnt || exit 11
for i in 1 2 3 4 5; do dd if=/dev/urandom of=/mnt/file$i bs=64k count=$((i * 16)) 2>/dev/null || exit 12; done
mkdir -p /mnt/dir/sub && echo hello > /mnt/dir/sub/note
(cd /mnt && sha256sum file1 file2 file3 file4 file5 dir/sub/note > SUMS) || exit 13
echo "=== BEGIN sums"; cat /mnt/SUMS; echo "=== END sums"
sync
umount /mnt || exit 14
"#;
    let run = vm.run(write, work.path()).unwrap();
    check(&run, &d);
    let sums = run.section("sums").unwrap();
    assert_eq!(sums.lines().count(), 6, "{sums}");
    assert!(d.stop().success(), "vmcrypt did not exit cleanly");

    let d = Vmcrypt::start(
        work.path(),
        "vmcrypt",
        &["--image", img.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let verify = r#"
e2fsck -n /dev/vda > /tmp/fsck.log 2>&1; echo "e2fsck rc=$?"
mount -t ext4 /dev/vda /mnt || exit 11
echo "=== BEGIN check"; (cd /mnt && sha256sum -c SUMS) 2>&1; rc=$?; echo "=== END check"
umount /mnt
exit $rc
"#;
    let run = vm.run(verify, work.path()).unwrap();
    eprintln!("{}", run.section("check").unwrap_or_default());
    check(&run, &d);
    assert!(run.console.contains("e2fsck rc=0"), "{}", run.tail());
    assert!(d.stop().success());
}

#[test]
fn discard_and_write_zeroes_from_the_guest() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let (_img, d) = start_encrypted(work.path(), "64M", &[]);
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let script = r#"
echo "discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes) write_zeroes_max_bytes=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0 ] || exit 9
dd if=/dev/urandom of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null || exit 10
/usr/sbin/blkdiscard -o 1048576 -l 4194304 /dev/vda || exit 11
/usr/sbin/blkdiscard -z -o 8388608 -l 4194304 /dev/vda || exit 12
echo 3 > /proc/sys/vm/drop_caches
zero4=$(head -c 4194304 /dev/zero | sha256sum | cut -d' ' -f1)
zero1=$(head -c 1048576 /dev/zero | sha256sum | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=1M skip=8 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "zeroed range: $got"
[ "$got" = "$zero4" ] || exit 13
around=$(dd if=/dev/vda bs=1M skip=7 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
after=$(dd if=/dev/vda bs=1M skip=12 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$around" != "$zero1" ] && [ "$after" != "$zero1" ] || exit 14
dd if=/dev/vda bs=1M skip=1 count=4 of=/dev/null 2>/dev/null || exit 15
"#;
    let run = vm.run(script, work.path()).unwrap();
    eprintln!(
        "{}",
        run.console
            .lines()
            .filter(|l| l.contains("max_bytes"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    check(&run, &d);
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let img = raw_image(work.path(), "ro.img", 64 << 20);
    std::fs::write(&img, vec![0x5au8; 64 << 20]).unwrap();
    let d = Vmcrypt::start(
        work.path(),
        "vmcrypt",
        &[
            "--image",
            img.to_str().unwrap(),
            "--read-only",
            "--num-queues",
            "2",
        ],
    )
    .unwrap();
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let script = r#"
ro=$(cat /sys/block/vda/ro); echo "ro=$ro"; [ "$ro" = 1 ] || exit 10
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then exit 11; fi
echo "write refused"
dd if=/dev/vda of=/dev/null bs=1M count=16 2>/dev/null || exit 12
"#;
    let run = vm.run(script, work.path()).unwrap();
    check(&run, &d);
    assert!(run.console.contains("write refused"));
    assert!(d.stop().success());
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0x5a),
        "the image changed"
    );
}

#[test]
fn no_plaintext_reaches_the_host() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    // vda: a raw control disk, vdb: the encrypted disk; the guest writes the
    // same pattern to both.
    let raw = raw_image(work.path(), "raw.img", 64 << 20);
    let dr = Vmcrypt::start(
        work.path(),
        "raw",
        &["--image", raw.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let (enc, de) = start_encrypted(work.path(), "64M", &[]);
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&dr.socket));
    vm.disks.push(Disk::new(&de.socket));
    let script = r#"
for i in $(seq 1 30); do [ -b /dev/vdb ] && break; sleep 0.1; done
echo "=== BEGIN fio"
fio --output-format=json --ioengine=libaio --direct=1 --iodepth=8 --rw=write --bs=64k --size=32M \
    --verify=pattern --verify_pattern=0x766d637279707421 --do_verify=1 --verify_fatal=1 \
    --name=raw --filename=/dev/vda --name=encrypted --filename=/dev/vdb
rc=$?
echo "=== END fio"
exit $rc
"#;
    let run = vm.run(script, work.path()).unwrap();
    let fio = run.fio("fio").unwrap();
    eprint!("{}", fio_summary(&fio));
    check(&run, &de);
    assert_eq!(fio_errors(&fio), 0);
    assert!(dr.stop().success() && de.stop().success());
    let marker = b"vmcrypt!";
    let count = |bytes: &[u8]| bytes.windows(8).filter(|w| w == marker).count();
    let raw_hits = count(&std::fs::read(&raw).unwrap());
    let enc_hits = count(&std::fs::read(&enc).unwrap());
    eprintln!("pattern found: raw image {raw_hits} times, encrypted image {enc_hits} times");
    assert!(
        raw_hits > 1000,
        "the control disk should hold the plaintext pattern"
    );
    assert_eq!(enc_hits, 0, "plaintext in the encrypted image");
}

#[test]
fn libvirt_domain_runs_fio_verify() {
    let (image, accel, _lock) = setup();
    let st = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/libvirt.sh"))
        .status()
        .unwrap();
    assert!(st.success(), "libvirtd is not available (ci/libvirt.sh)");
    let work = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt-qemu (group kvm): it must reach the socket, the
    // kernel and the initrd.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_img, d) = start_encrypted(
        work.path(),
        "256M",
        &["--socket-group", "kvm", "--socket-mode", "0660"],
    );
    let initrd = image.with_script(FIO_VERIFY, work.path()).unwrap();
    std::fs::set_permissions(&initrd, std::fs::Permissions::from_mode(0o644)).unwrap();
    let name = format!("vmcrypt-test-{}", std::process::id());
    let console = work.path().join("console.log");
    let run = guest_tests::libvirt::run(
        &name,
        accel,
        &image.kernel,
        &initrd,
        &d.socket,
        &console,
        work.path(),
        std::time::Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    expect_fio_verify(&run, &d);
}

#[test]
fn the_readme_shows_the_tested_domain_xml() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(
        readme.contains(guest_tests::libvirt::DOMAIN_XML.trim()),
        "README's domain XML differs from the tested one"
    );
}

#[test]
fn vmcrypt_restarts_while_the_guest_idles() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let (img, d) = start_encrypted(work.path(), "256M", &[]);
    let mut vm = Vm::new(&image, accel);
    let mut disk = Disk::new(&d.socket);
    disk.reconnect = true;
    vm.disks.push(disk);
    let script = format!(
        r#"
dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null || exit 9
before=$(dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum)
echo "=== IDLE"
sleep 15
echo 3 > /proc/sys/vm/drop_caches
after=$(dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum)
[ "$before" = "$after" ] || exit 8
{FIO_VERIFY}"#
    );
    let mut running = vm.spawn(&script, work.path()).unwrap();
    running.wait_for("=== IDLE").unwrap();
    assert!(d.stop().success(), "vmcrypt did not stop cleanly");
    let d = Vmcrypt::start_on(
        &work.path().join("vmcrypt.sock"),
        work.path(),
        "vmcrypt",
        &["--image", img.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let run = running
        .finish()
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    expect_fio_verify(&run, &d);
    assert!(
        d.log_text().matches("frontend connected").count() >= 2,
        "QEMU did not reconnect:\n{}",
        d.log_text()
    );
}

/// `resize` over the control socket while the guest runs: QEMU gets the
/// config-change message, the guest's kernel sees the new capacity without
/// a reboot, and fio verify passes in the new space.
#[test]
fn the_guest_sees_a_live_resize() {
    let (image, accel, _lock) = setup();
    let work = tempfile::tempdir().unwrap();
    let control = work.path().join("control.sock");
    let (_img, d) = start_encrypted(
        work.path(),
        "128M",
        &["--control", control.to_str().unwrap()],
    );
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let script = r#"
echo "=== BEGIN before"; cat /sys/block/vda/size; echo "=== END before"
echo "=== RESIZE-NOW"
i=0
while [ "$(cat /sys/block/vda/size)" = 262144 ]; do
  i=$((i+1)); [ $i -gt 600 ] && exit 7
  sleep 0.1
done
echo "=== BEGIN after"; cat /sys/block/vda/size; echo "=== END after"
echo "=== BEGIN fio"
fio --output-format=json --name=grown --filename=/dev/vda --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=randwrite --bsrange=4k-64k --offset=128M --size=64M \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --random_generator=tausworthe64
rc=$?
echo "=== END fio"
exit $rc
"#;
    let mut running = vm.spawn(script, work.path()).unwrap();
    running.wait_for("=== RESIZE-NOW").unwrap();
    let out = std::process::Command::new(guest_tests::vmcrypt::binary())
        .args(["ctl", "--json", "--control", control.to_str().unwrap()])
        .args(["resize", "size=192M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["frontend_notified"], true, "{r}");
    let run = running
        .finish()
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    assert_eq!(run.section("before").as_deref(), Some("262144"));
    assert_eq!(
        run.section("after").as_deref(),
        Some("393216"),
        "{}",
        run.tail()
    );
    expect_fio_verify(&run, &d);
    assert!(d.stop().success());
}

/// The snapshot of a 4 GiB encrypted disk on XFS while the guest writes:
/// it holds what the guest wrote before (qemu-io checks the pattern through
/// QEMU's own LUKS driver, with the snapshot's own key descriptor), the
/// live disk holds what came after, and the queues were held for
/// `pause_ms`, printed for the README.
#[test]
fn snapshot_while_the_guest_writes_on_xfs() {
    let (image, accel, _lock) = setup();
    let xfs = guest_tests::xfs::Xfs::mount(8 << 30).unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = encrypted_image(&xfs.mnt, "disk.img", "4G");
    // Data in all of it, as a disk in use has: the reflink shares extents.
    let out = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=4M",
            "seek=1",
            "count=1024",
            "conv=notrunc,fsync",
        ])
        .arg(format!("of={}", img.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let control = work.path().join("control.sock");
    let d = Vmcrypt::start(
        work.path(),
        "vmcrypt",
        &[
            "--image",
            img.to_str().unwrap(),
            "--num-queues",
            "2",
            "--control",
            control.to_str().unwrap(),
        ],
    )
    .unwrap();
    let mut vm = Vm::new(&image, accel);
    vm.disks.push(Disk::new(&d.socket));
    let script = r#"
w() { fio --name=$1 --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=4 --bs=1M \
        --size=64M --rw=write --verify=pattern --verify_pattern=$2 --do_verify=$3 --verify_fatal=1 >/dev/null || exit 5; }
w before 0x41 0
fio --name=bg --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --offset=1G --size=1G --time_based --runtime=10 >/dev/null &
sleep 2
echo "=== SNAP-NOW"
sleep 5
w after 0x42 1
wait
echo "=== BEGIN fio"; echo '{}'; echo "=== END fio"
"#;
    let mut running = vm.spawn(script, work.path()).unwrap();
    running.wait_for("=== SNAP-NOW").unwrap();
    let mut pauses = Vec::new();
    for i in 0..3 {
        let snap = xfs.mnt.join(format!("snap{i}.img"));
        let out = std::process::Command::new(guest_tests::vmcrypt::binary())
            .args(["ctl", "--json", "--control", control.to_str().unwrap()])
            .arg("snapshot")
            .arg(format!("path={}", snap.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("snapshot {i}: {r}");
        pauses.push(r["pause_ms"].as_f64().unwrap());
    }
    eprintln!(
        "snapshot pause of a 4 GiB encrypted image on XFS while the guest writes: {pauses:.2?} ms"
    );
    let run = running
        .finish()
        .unwrap_or_else(|e| panic!("{e}\nvmcrypt log:\n{}", d.log_text()));
    check(&run, &d);
    assert!(d.stop().success());

    // qemu-io, with each image's own key, checks the patterns.
    let qemu_read = |img: &std::path::Path, pattern: &str| {
        let pass = work.path().join("pass");
        let _ = std::fs::remove_file(&pass);
        let out = std::process::Command::new(guest_tests::vmcrypt::binary())
            .arg("export-passphrase")
            .arg(img)
            .arg("--output")
            .arg(&pass)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("qemu-io")
            .arg("--object")
            .arg(format!("secret,id=s0,file={}", pass.display()))
            .arg("--image-opts")
            .arg(format!(
                "driver=luks,key-secret=s0,file.filename={}",
                img.display()
            ))
            .args(["-c", &format!("read -P {pattern} 0 64M")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{}: {text}{}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    qemu_read(&xfs.mnt.join("snap0.img"), "0x41");
    qemu_read(&xfs.mnt.join("snap2.img"), "0x41");
    qemu_read(&img, "0x42");
}

/// An encrypted disk on Ceph RBD (`vmcrypt create rbd:...`, a single-node
/// cluster from ci/ceph.sh): the guest runs fio verify on both queues.
#[test]
fn encrypted_rbd_disk_passes_fio_verify() {
    let (image, accel, _lock) = setup();
    let ceph = guest_tests::ceph::Ceph::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let conf = ceph.conf.to_str().unwrap();
    guest_tests::vmcrypt::create_encrypted_rbd(work.path(), "rbd:rbd/guest", "256M", &ceph.conf)
        .unwrap();
    let d = Vmcrypt::start(
        work.path(),
        "vmcrypt",
        &[
            "--image",
            "rbd:rbd/guest",
            "--ceph-conf",
            conf,
            "--num-queues",
            "2",
        ],
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
    expect_fio_verify(&run, &d);
    assert!(d.stop().success());
}
