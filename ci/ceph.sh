#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for the RBD tests: one monitor, one
# memstore OSD, pool "rbd" of size 1, all under one folder, on loopback.
#
#   ci/ceph.sh start DIR [--cephx]   starts it (about 1-2 s); DIR/ceph.conf is
#                                    the client config; with --cephx, auth is
#                                    on and DIR/client.admin.keyring holds the
#                                    admin key
#   ci/ceph.sh restart-mon DIR       restarts the monitor (clients reconnect)
#   ci/ceph.sh stop DIR              stops it (OSD first, then the monitor)
#
# Settings from ../shared/NOTES.md: memstore (compiled into Debian's build),
# pool size 1, a short paxos interval so that start-up takes ~1 s, no mgr.
set -euo pipefail

cmd=${1:?usage: ci/ceph.sh start|stop DIR [--cephx]}
dir=${2:?usage: ci/ceph.sh start|stop DIR [--cephx]}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/ceph.conf"

stop() {
  for d in osd mon; do
    if [ -f "$dir/$d.pid" ]; then
      pid=$(cat "$dir/$d.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do
        # A daemon reparented to init lingers as a zombie for a moment.
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
        [ "$state" = gone ] || [ "$state" = Z ] && break
        sleep 0.05
      done
      rm -f "$dir/$d.pid"
    fi
  done
}

case "$cmd" in
  stop)
    stop
    exit 0
    ;;
  restart-mon)
    # Clients lose their monitor session and must reconnect (new sockets).
    pid=$(cat "$dir/mon.pid")
    kill "$pid"
    for _ in $(seq 100); do
      state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
      [ "$state" = gone ] || [ "$state" = Z ] && break
      sleep 0.05
    done
    ceph-mon -c "$conf" -i a
    exit 0
    ;;
  start) ;;
  *)
    echo "ci/ceph.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac

auth=none
[ "${3:-}" = --cephx ] && auth=cephx
stop
rm -rf "$dir/mon" "$dir/osd" "$dir"/*.keyring "$dir/monmap"
mkdir -p "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"
# Each cluster gets its own ports (tests may run one with and one without
# cephx): derived from the folder's name.
port=${CEPH_PORT:-$((20000 + $(printf "%s" "$dir" | cksum | cut -d" " -f1) % 20000))}
fsid=$(cat /proc/sys/kernel/random/uuid)

cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
keyring = $dir/client.admin.keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/\$type.pid
log file = $dir/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.05
mon data = $dir/mon
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = 2147483648
memstore page set = true
EOF

if [ "$auth" = cephx ]; then
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
  mon_keyring=(--keyring "$dir/mon.keyring")
else
  mon_keyring=()
fi

monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" "${mon_keyring[@]}"
ceph-mon -c "$conf" -i a
uuid=$(cat /proc/sys/kernel/random/uuid)
id=$(ceph -c "$conf" osd new "$uuid")
if [ "$auth" = cephx ]; then
  ceph -c "$conf" auth get-or-create "osd.$id" mon 'allow profile osd' osd 'allow *' \
    -o "$dir/osd/keyring" >/dev/null
fi
ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" --keyring "$dir/osd/keyring" 2>/dev/null
ceph-osd -c "$conf" -i "$id" --keyring "$dir/osd/keyring" 2>>"$dir/log/osd-start.log"
for _ in $(seq 200); do
  ceph -c "$conf" osd dump 2>/dev/null | grep -q "^osd.$id up" && break
  sleep 0.05
done
ceph -c "$conf" osd dump | grep -q "^osd.$id up" || {
  echo "ci/ceph.sh: osd.$id did not come up; see $dir/log" >&2
  exit 1
}
ceph -c "$conf" osd pool create rbd 8 >/dev/null 2>&1
rbd -c "$conf" pool init rbd
echo "ceph: cluster up in $dir (auth $auth, mon 127.0.0.1:$port), conf $conf"
