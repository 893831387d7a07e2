#!/usr/bin/env bash
# The comparison harness: uring-ssh beside ssh2-rs, async-ssh2-lite, russh,
# the OpenSSH tools and two ceilings, every scenario, one table.
#
#   bash scripts/compare.sh [--smoke] [--json FILE] [more options of examples/compare/main.rs]
#
# As root on a fresh Debian/Ubuntu machine it first installs what is
# missing (scripts/setup.sh --bench: the test dependencies, rsync, strace
# and perf). Then it builds the peer programs (benches/peers, a workspace of
# its own, kept out of the library's dependencies) and the harness, and runs
# the harness pinned to core 0 (it pins its sshd to core 1). Exits non-zero
# if any row failed.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
jobs=${JOBS:-2}

if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup.sh --bench
else
    echo "compare.sh: not root, installing nothing (scripts/setup.sh --bench installs what is missing)" >&2
fi

echo "compare.sh: building the peer programs (benches/peers)"
t0=$(date +%s)
# The peers keep their own target directory whatever CARGO_TARGET_DIR says.
(cd benches/peers && env -u CARGO_TARGET_DIR cargo build --release -j "$jobs")
echo "compare.sh: building the harness"
cargo build --release -j "$jobs" --example compare
echo "compare.sh: builds took $(($(date +%s) - t0)) s"

bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/compare"
pin=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    pin=(taskset -c 0)
fi
exec "${pin[@]}" "$bin" --peers "$root/benches/peers/target/release" "$@"
