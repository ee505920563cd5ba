//! Guests started by a real libvirtd from domain XML.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::vm::{Accel, GuestRun};

/// The domain the tests run, and the README shows: a vhost-user disk on a
/// vmcrypt socket, with the guest's memory shared (memfd) as vhost-user
/// needs. Placeholders: NAME, TYPE (qemu or kvm), KERNEL, INITRD, SOCKET, CONSOLE.
pub const DOMAIN_XML: &str = r#"<domain type='TYPE'>
  <name>NAME</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>KERNEL</kernel>
    <initrd>INITRD</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='2'/>
      <source type='unix' path='SOCKET'>
        <reconnect enabled='yes' timeout='10'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='CONSOLE'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"#;

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Runs a transient domain and waits for it to power off.
#[allow(clippy::too_many_arguments)]
pub fn run(
    name: &str,
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    socket: &Path,
    console: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<GuestRun, String> {
    let xml = DOMAIN_XML
        .replace("TYPE", if accel == Accel::Kvm { "kvm" } else { "qemu" })
        .replace("NAME", name)
        .replace("KERNEL", &kernel.display().to_string())
        .replace("INITRD", &initrd.display().to_string())
        .replace("SOCKET", &socket.display().to_string())
        .replace("CONSOLE", &console.display().to_string());
    let xml_path = work.join(format!("{name}.xml"));
    std::fs::write(&xml_path, xml).map_err(|e| e.to_string())?;
    let _ = virsh(&["destroy", name]);
    virsh(&["create", xml_path.to_str().unwrap()]).map_err(|e| format!("virsh create: {e}"))?;
    let start = Instant::now();
    let mut finished = false;
    while start.elapsed() < timeout {
        match virsh(&["domstate", name]) {
            Ok(state) if state.contains("running") || state.contains("paused") => {}
            _ => {
                finished = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if !finished {
        let _ = virsh(&["destroy", name]);
    }
    let console_text = std::fs::read_to_string(console).unwrap_or_default();
    let log =
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap_or_default();
    GuestRun::from_console(
        console_text,
        start.elapsed().as_secs_f64(),
        finished,
        timeout,
        &log,
    )
}
