#!/usr/bin/env bash
# PyKMIP test servers for vmcrypt's KMIP tests (loopback only).
#
#   ci/kms.sh setup DIR        venv with PyKMIP 0.11.0 (pinned), throwaway CA,
#                              server and client certificates (ECDSA P-256),
#                              plus a second CA and client that servers must refuse
#   ci/kms.sh serve DIR PORT   run a server on 127.0.0.1:PORT in the foreground
#                              (its database: DIR/db-PORT.sqlite)
#   ci/kms.sh start DIR PORT   the same in the background (pid in DIR/server-PORT.pid)
#   ci/kms.sh stop DIR         stop the background servers
#   ci/kms.sh config DIR PORT... print a vmcrypt KMS config for these servers
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,13p' "$0"; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

PINS="pykmip==0.11.0 cryptography==50.0.2 SQLAlchemy==2.1.9 six==1.17.0 requests==2.34.2 cffi==2.1.1 pycparser==3.12 typing_extensions==4.16.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 enum-compat==0.0.3"

PROM_PIN="prometheus-client==0.21.1"

cert() { # name cn eku ca
  local name=$1 cn=$2 eku=$3 ca=$4 san=${5:-}
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$name.ec.key" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$dir/$name.ec.key" -out "$dir/$name.key"
  rm -f "$dir/$name.ec.key"
  openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$dir/$name.csr" 2>/dev/null
  {
    echo "extendedKeyUsage=$eku"
    echo "keyUsage=digitalSignature,keyAgreement"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
  chmod 600 "$dir/$name.key"
}

ca() { # name cn
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$1.ec.key" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$dir/$1.ec.key" -out "$dir/$1.key"
  rm -f "$dir/$1.ec.key"
  openssl req -x509 -new -key "$dir/$1.key" -sha256 -days 3650 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/$1.crt" 2>/dev/null
}

case "$cmd" in
setup)
  if [ ! -x "$dir/venv/bin/pykmip-server" ]; then
    echo "kms: installing PyKMIP into $dir/venv"
    python3 -m venv "$dir/venv"
    # shellcheck disable=SC2086
    "$dir/venv/bin/pip" install -q --disable-pip-version-check $PINS
  fi
  # The control socket tests parse `metrics` with Prometheus' own parser.
  if ! "$dir/venv/bin/python" -c "import prometheus_client" 2>/dev/null; then
    "$dir/venv/bin/pip" install -q --disable-pip-version-check "$PROM_PIN"
  fi
  if [ ! -f "$dir/client.crt" ]; then
    echo "kms: making certificates in $dir"
    ca ca "vmcrypt test CA"
    cert server localhost serverAuth ca "DNS:localhost,IP:127.0.0.1"
    cert client vmcrypt clientAuth ca
    ca other-ca "someone else's CA"
    cert other-client vmcrypt clientAuth other-ca
    mkdir -p "$dir/policies"
  fi
  echo "kms: ready in $dir"
  ;;
serve|start)
  port=${3:?port}
  conf="$dir/server-$port.conf"
  cat > "$conf" <<CONF
[server]
hostname=127.0.0.1
port=$port
certificate_path=$dir/server.crt
key_path=$dir/server.key
ca_path=$dir/ca.crt
auth_suite=TLS1.2
policy_path=$dir/policies
enable_tls_client_auth=True
tls_cipher_suites=
    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
logging_level=INFO
database_path=$dir/db-$port.sqlite
CONF
  if [ "$cmd" = serve ]; then
    exec "$dir/venv/bin/python" -W ignore "$dir/venv/bin/pykmip-server" -f "$conf" -l "$dir/server-$port.log"
  fi
  "$dir/venv/bin/python" -W ignore "$dir/venv/bin/pykmip-server" -f "$conf" -l "$dir/server-$port.log" &
  echo $! > "$dir/server-$port.pid"
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { echo "kms: server on 127.0.0.1:$port"; exit 0; }
    sleep 0.1
  done
  echo "kms: server on port $port did not come up; see $dir/server-$port.log" >&2
  exit 1
  ;;
stop)
  for pid in "$dir"/server-*.pid; do
    [ -f "$pid" ] || continue
    kill -INT "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
  done
  ;;
config)
  shift 2
  servers=$(printf '"localhost:%s", ' "$@")
  cat <<CONF
[kms]
servers = [${servers%, }]
ca = "$dir/ca.crt"
client_cert = "$dir/client.crt"
client_key = "$dir/client.key"
timeout_ms = 5000
CONF
  ;;
*)
  sed -n '2,13p' "$0"; exit 2 ;;
esac
