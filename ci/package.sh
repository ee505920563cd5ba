#!/usr/bin/env bash
# Builds the Debian package of vmcrypt with cargo-deb:
#
#   bash ci/package.sh           builds target/debian/vmcrypt_*.deb
#   bash ci/package.sh --check   also checks it on this machine: lintian,
#                                dpkg -i, the installed binary, man pages,
#                                units, bash completion, the protocol tests
#                                against /usr/bin/vmcrypt, then dpkg -r
#
# Man pages and completions are generated from the clap definitions by the
# binary itself (`vmcrypt manpages DIR`, `vmcrypt completions SHELL`), so
# they never drift from --help.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --version 3.8.0
need=()
for cmd in lintian dpkg-shlibdeps man systemd-analyze; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[ -f /usr/share/bash-completion/bash_completion ] || need+=(bash-completion)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends lintian dpkg-dev man-db bash-completion systemd
fi

VMCRYPT_GIT_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown) \
  cargo build --release -p vmcrypt
bin=target/release/vmcrypt
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions
"$bin" manpages target/assets/man
gzip -9n target/assets/man/*.1
"$bin" completions bash > target/assets/completions/vmcrypt.bash
"$bin" completions zsh > target/assets/completions/_vmcrypt
"$bin" completions fish > target/assets/completions/vmcrypt.fish
cargo deb -p vmcrypt --no-build --strip
deb=$(ls -t target/debian/vmcrypt_*.deb | head -1)
echo "package: $deb"

[ "${1:-}" = --check ] || exit 0

echo "== lintian"
# Errors fail the check; warnings are shown.
lintian --fail-on error "$deb"

echo "== dpkg -i"
if dpkg -s vmcrypt >/dev/null 2>&1; then
  echo "vmcrypt is installed already (a check that failed before?): purging it first"
  dpkg --purge vmcrypt
fi
dpkg -i "$deb"
# Whatever fails below, the machine is left as it was.
trap 'dpkg --purge vmcrypt >/dev/null 2>&1 || true' EXIT
/usr/bin/vmcrypt --version
/usr/bin/vmcrypt --version | grep -q "XTS engine"

echo "== man pages"
pages=$(dpkg -L vmcrypt | grep '^/usr/share/man/man1/.*\.1\.gz$')
[ "$(echo "$pages" | wc -l)" -ge 10 ] || { echo "too few man pages: $pages"; exit 1; }
for p in $pages; do
  man -l "$p" 2>&1 >/dev/null | (! grep .) || { echo "man -l $p complained"; exit 1; }
  [ "$(man -l "$p" 2>/dev/null | wc -l)" -gt 5 ] || { echo "man -l $p: empty"; exit 1; }
done
man -l /usr/share/man/man1/vmcrypt-serve.1.gz | grep -q -- "--control-mode"

echo "== systemd units"
grep -q '^ExecStart=/usr/bin/vmcrypt ' /lib/systemd/system/vmcrypt@.service
systemd-analyze verify /lib/systemd/system/vmcrypt@.socket /lib/systemd/system/vmcrypt@.service

echo "== bash completion"
words=$(bash -c 'source /usr/share/bash-completion/bash_completion
  source /usr/share/bash-completion/completions/vmcrypt
  COMP_WORDS=(vmcrypt se); COMP_CWORD=1; COMP_LINE="vmcrypt se"; COMP_POINT=${#COMP_LINE}
  _vmcrypt vmcrypt se vmcrypt; echo "${COMPREPLY[@]}"')
echo "vmcrypt se<TAB>: $words"
[[ " $words " == *" serve "* ]]

echo "== the protocol tests against the installed /usr/bin/vmcrypt"
VMCRYPT_BIN=/usr/bin/vmcrypt cargo test -p vmcrypt --test protocol

echo "== dpkg -r keeps the configuration"
dpkg -r vmcrypt
[ ! -e /usr/bin/vmcrypt ] && [ ! -e /lib/systemd/system/vmcrypt@.service ]
[ -f /etc/vmcrypt/disk.toml.example ]
dpkg --purge vmcrypt
[ ! -e /etc/vmcrypt/disk.toml.example ]
echo "package check: ok"
