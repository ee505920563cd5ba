#!/usr/bin/env python3
"""Runs vmcrypt where a test expects qemu-storage-daemon.

QEMU's vhost-user-blk qtest starts the binary named by
QTEST_QEMU_STORAGE_DAEMON_BINARY with a qemu-storage-daemon command line:

  --blockdev driver=file,node-name=disk0,filename=IMG
  --export type=vhost-user-blk,id=disk0,addr.type=fd,addr.str=N,
           node-name=disk0,writable=on,num-queues=N

Each export becomes one `vmcrypt serve --image IMG --socket-fd N
--num-queues N [--read-only]` (or `--socket PATH` for addr.type=unix).
SIGTERM and SIGINT are passed on; the exit status is 0 only when every
vmcrypt exits 0, as the test checks of qemu-storage-daemon.

The vmcrypt binary is $VMCRYPT (default: vmcrypt on PATH).
"""
import os
import signal
import subprocess
import sys


def options(text):
    """'a=1,b=2' -> {'a': '1', 'b': '2'} (no escaped commas in these tests)."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def parse(argv):
    blockdevs, exports = {}, []
    it = iter(argv)
    for arg in it:
        name, eq, inline = arg.partition("=")
        if name in ("--blockdev", "--export"):
            value = inline if eq else next(it, None)
            if value is None:
                sys.exit(f"qsd-as-vmcrypt: {name} needs a value")
            o = options(value)
            if name == "--blockdev":
                if o.get("driver") != "file" or "filename" not in o:
                    sys.exit(f"qsd-as-vmcrypt: only driver=file blockdevs: {value}")
                blockdevs[o.get("node-name", "")] = o["filename"]
            else:
                if o.get("type") != "vhost-user-blk":
                    sys.exit(f"qsd-as-vmcrypt: only vhost-user-blk exports: {value}")
                exports.append(o)
        else:
            sys.exit(f"qsd-as-vmcrypt: unsupported argument {arg}")
    return blockdevs, exports


def command(vmcrypt, blockdevs, e):
    image = blockdevs.get(e.get("node-name", ""))
    if image is None:
        sys.exit(f"qsd-as-vmcrypt: export {e} names no known blockdev")
    cmd = [vmcrypt, "serve", "--image", image,
           "--num-queues", e.get("num-queues", "1"),
           "--log-level", os.environ.get("VMCRYPT_LOG", "warn")]
    addr = e.get("addr.type")
    if addr == "fd":
        cmd += ["--socket-fd", e["addr.str"]]
    elif addr == "unix":
        cmd += ["--socket", e["addr.path"]]
    else:
        sys.exit(f"qsd-as-vmcrypt: unsupported addr.type {addr}")
    if e.get("writable", "off") != "on":
        cmd.append("--read-only")
    return cmd


def main():
    vmcrypt = os.environ.get("VMCRYPT", "vmcrypt")
    blockdevs, exports = parse(sys.argv[1:])
    children = []
    for e in exports:
        fds = (int(e["addr.str"]),) if e.get("addr.type") == "fd" else ()
        children.append(subprocess.Popen(command(vmcrypt, blockdevs, e), pass_fds=fds))

    def forward(sig, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # One vmcrypt failing ends the others: the test sees the daemon exit.
    status = 0
    running = {c.pid: c for c in children}
    while running:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        if running.pop(pid, None) is None:
            continue
        if os.waitstatus_to_exitcode(wstatus) != 0:
            status = 1
            forward(signal.SIGTERM, None)
    sys.exit(status)


if __name__ == "__main__":
    main()
