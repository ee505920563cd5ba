//! A harness that runs real guests on vmcrypt disks: a small guest (Debian's
//! cloud kernel, busybox, fio) is prepared once and cached under `target/`,
//! QEMU boots it with vhost-user-blk disks served by `vmcrypt serve`
//! processes, a shell script runs inside, and its output (fio's JSON, exit
//! codes) comes back over the serial console.

pub mod ceph;
pub mod guest;
pub mod libvirt;
pub mod qemu;
pub mod qmp;
pub mod vm;
pub mod vmcrypt;
pub mod xfs;

pub use guest::GuestImage;
pub use vm::{Accel, Disk, GuestRun, RunningVm, Vm};
pub use vmcrypt::Vmcrypt;

/// Guests run one at a time, as the machine has two cores: the prepared
/// guest, the accelerator to boot it with, and the lock that keeps the other
/// guests of this test process waiting while it is held.
pub fn one_guest() -> (GuestImage, Accel, std::sync::MutexGuard<'static, ()>) {
    static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let lock = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::prepare().expect("prepare guest");
    let accel = Accel::detect(&image);
    eprintln!("guest accelerator: {accel:?}");
    (image, accel, lock)
}
