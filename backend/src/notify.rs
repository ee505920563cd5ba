//! systemd's readiness protocol (`sd_notify`): with `Type=notify`, systemd
//! waits for `READY=1` before it counts the service as started, and shows
//! `STOPPING=1` while vmcrypt drains. Without `NOTIFY_SOCKET` nothing is
//! sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one.
/// Failures are logged, never fatal: the daemon serves either way.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = (|| -> std::io::Result<()> {
        let addr = match path.strip_prefix('@') {
            // An abstract socket.
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    match sent {
        Ok(()) => tracing::debug!(state, "notified the service manager"),
        Err(e) => {
            tracing::warn!(socket = %path, "cannot notify the service manager ({state}): {e}")
        }
    }
}
