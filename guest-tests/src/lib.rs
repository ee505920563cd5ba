//! A harness that runs real guests on vmcrypt disks: a small guest (Debian's
//! cloud kernel, busybox, fio) is prepared once and cached under `target/`,
//! QEMU boots it with vhost-user-blk disks served by `vmcrypt serve`
//! processes, a shell script runs inside, and its output (fio's JSON, exit
//! codes) comes back over the serial console.

pub mod guest;
pub mod libvirt;
pub mod qmp;
pub mod vm;
pub mod vmcrypt;

pub use guest::GuestImage;
pub use vm::{Accel, Disk, GuestRun, RunningVm, Vm};
pub use vmcrypt::Vmcrypt;
