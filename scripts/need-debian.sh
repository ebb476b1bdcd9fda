#!/usr/bin/env bash
# Installs the Debian packages named on the command line that are not installed yet
# (as root, or through sudo), without starting any system-wide service. Tests and
# benchmark scripts call it for what they need (fuse3, gocryptfs, fio, ...), so a fresh
# machine and CI get the same tools.
#
#   scripts/need-debian.sh fuse3 fio
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need-debian.sh: needs root or sudo to install ${missing[*]}" >&2; exit 2; }
    SUDO=sudo
fi
echo "== installing ${missing[*]}" >&2
# One installer at a time: tests run in parallel and dpkg takes a lock of its own.
exec 9>/tmp/portswitch-need-debian.lock
flock 9
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
