#!/usr/bin/env bash
# The README's main command: builds ussh, starts throwaway OpenSSH servers on
# loopback under many host aliases, and runs `ussh exec`, `get` and `put`
# across them with progress shown, then prints the summary and figures.
# Extra arguments go to the demo (see --help). The library's own transfer
# demo is `cargo run --release --example demo`.
set -euo pipefail

cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-/root}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME:-/root}/.cargo/env"
fi
cargo build --release -p ussh --bin ussh
cargo run --release -p ussh --example fleet -- "$@"
