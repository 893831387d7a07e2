#!/usr/bin/env bash
# Installs what building and running uring-ssh against a throwaway loopback
# sshd needs on a fresh Debian/Ubuntu machine (as root). Re-runs are fast:
# apt is only touched when a package is missing. `--bench` adds what the
# comparison harness (scripts/compare.sh) runs: rsync and strace, and perf
# where the distribution has it as `linux-perf` (the harness counts system
# calls with strace otherwise).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/setup.sh: run as root (installs packages)" >&2
    exit 1
fi

# System packages: only touch apt when something is missing, so re-runs are fast.
# openssh-client brings ssh-keygen, ssh-agent and ssh-add (fixture and agent
# tests) and scp, which the SCP tests run on the server side. time is GNU
# time: ussh's tests read its peak memory from it. sudo: ussh's --sudo
# tests run commands under it as the test user.
# dropbear-bin and debootstrap (with Debian's archive keys) bring the other
# servers of tests/interop.rs: Dropbear, and OpenSSH 10 in a Debian 13 tree.
packages=(openssh-server openssh-client libssl-dev pkg-config zlib1g-dev cmake build-essential time
    sudo dropbear-bin debootstrap debian-archive-keyring)
bench=false
if [ "${1:-}" = "--bench" ]; then
    bench=true
    packages+=(rsync strace)
fi
missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package from starting a system sshd on :22 (the test user has a
    # known password); the tests start their own sshd on loopback.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update
    apt-get install -y "${missing[@]}"
fi

if $bench && ! command -v perf >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y linux-perf ||
        echo "scripts/setup.sh: no linux-perf package; system calls will be counted with strace" >&2
fi

# sshd's privilege separation directory.
mkdir -p /run/sshd
chmod 755 /run/sshd

# OpenSSH 10 (Debian 13) for tests/interop.rs, run under chroot on loopback.
# Built once from the machine's configured Debian mirror (~1 minute, ~260
# MB) and kept; delete the directory to rebuild it.
trixie=/var/cache/uring-ssh/trixie
if [ ! -x "$trixie/usr/sbin/sshd" ]; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    if [ -z "$mirror" ]; then
        mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*debian\)\/* .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "building the Debian 13 tree for OpenSSH 10 in $trixie from $mirror"
    rm -rf "$trixie.tmp"
    mkdir -p "$(dirname "$trixie")"
    debootstrap --variant=minbase --include=openssh-server,openssh-sftp-server \
        trixie "$trixie.tmp" "$mirror" >/tmp/uring-ssh-debootstrap.log 2>&1 || {
        tail -n 30 /tmp/uring-ssh-debootstrap.log >&2
        echo "scripts/setup.sh: debootstrap of Debian 13 failed (log above)" >&2
        exit 1
    }
    mv "$trixie.tmp" "$trixie"
fi
