#!/usr/bin/env bash
# Client CPU per handshake, post-quantum (mlkem768x25519-sha256) against
# curve25519-sha256: uring-ssh, russh and OpenSSH 10.0's ssh against an
# OpenSSH 10.0 server (benches/handshake_pq.rs). Builds what it runs.
# Usage: bash scripts/handshake-bench.sh [--count N] [--runs R]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --example compare
(cd benches/peers && cargo build --release --bin peer_russh)
cargo bench --bench handshake_pq -- "$@"
