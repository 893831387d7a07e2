#!/usr/bin/env bash
# The README's main command: starts a throwaway OpenSSH server on loopback and
# runs the demo job against it (single-stream and parallel transfers, random
# drops), printing MB/s, CPU and io_uring submissions per MiB, and drop
# statistics. Extra arguments go to the demo (see --help).
set -euo pipefail

cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-/root}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME:-/root}/.cargo/env"
fi
cargo run --release --example demo -- "$@"
