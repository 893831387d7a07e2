#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ from its seeds and corpus; fails on
# the first crash, panic, leak report, timeout or out-of-memory.
#
#   bash scripts/fuzz-smoke.sh            # each target for FUZZ_SECONDS (default 20) s: CI
#   bash scripts/fuzz-smoke.sh --full     # each target for 10,000,000 inputs
#   bash scripts/fuzz-smoke.sh [--full] host_list ssh_config   # only these
#
# Needs the nightly toolchain (installed with rustup if missing) and
# cargo-fuzz (installed if missing). A crashing input is written to
# fuzz/artifacts/<target>/; add it to fuzz/seeds/<target>/ once fixed.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"

full=0
targets=()
for a in "$@"; do
    case "$a" in
        --full) full=1 ;;
        -*) echo "fuzz-smoke.sh: unknown option $a" >&2; exit 2 ;;
        *) targets+=("$a") ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    for f in fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-/root}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME:-/root}/.cargo/env"
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked
fi

# -O: optimised; -a: with debug assertions (overflow checks on).
# AddressSanitizer (cargo-fuzz's default) everywhere in the smoke run: one
# build. The full run drops it for the targets that are safe Rust only
# (the ussh parsers), where it finds nothing and costs 10x the time.
flags=(-O -a)
safe_rust=" host_list ssh_config "
if [ "$full" = 1 ]; then
    limit=(-runs=10000000)
else
    limit=(-max_total_time="${FUZZ_SECONDS:-20}")
fi

start=$(date +%s)
cargo +nightly fuzz build "${flags[@]}"
echo "fuzz-smoke: built in $(($(date +%s) - start)) s"

for t in "${targets[@]}"; do
    flags=(-O -a)
    if [ "$full" = 1 ] && [[ "$safe_rust" == *" $t "* ]]; then
        flags+=(-s none)
    fi
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    t0=$(date +%s)
    echo "fuzz-smoke: $t (${limit[*]})"
    # libFuzzer exits non-zero on a crash, a leak, a timeout (10 s per
    # input) or RSS above 2 GiB; its last lines say which.
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "${seeds[@]}" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"corpus/$t.log" 2>&1; then
        tail -n 40 "corpus/$t.log" >&2
        echo "fuzz-smoke: $t FAILED (log: fuzz/corpus/$t.log, input: fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "corpus/$t.log" | tail -n 1)
    echo "fuzz-smoke: $t ok: ${runs:-?} inputs in $(($(date +%s) - t0)) s"
done
echo "fuzz-smoke: all ${#targets[@]} targets ok in $(($(date +%s) - start)) s"
