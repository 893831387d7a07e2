#!/usr/bin/env bash
# The project's test command: sets up a fresh Debian/Ubuntu machine (as root)
# for the SSH integration tests, then builds and runs them.
# Usage: bash scripts/test.sh [extra `cargo test` args, e.g. --test fixture]
set -euo pipefail

cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: run as root (installs packages, creates a test user)" >&2
    exit 1
fi

bash scripts/setup.sh

# Password-auth test user; name and password come from the fixture's constants.
fixture=testkit/src/sshd.rs
test_user=$(sed -n 's/^pub const TEST_USER: &str = "\(.*\)";$/\1/p' "$fixture")
test_password=$(sed -n 's/^pub const TEST_PASSWORD: &str = "\(.*\)";$/\1/p' "$fixture")
if [ -z "$test_user" ] || [ -z "$test_password" ]; then
    echo "scripts/test.sh: cannot read TEST_USER/TEST_PASSWORD from $fixture" >&2
    exit 1
fi
if ! id "$test_user" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$test_user"
    echo "$test_user:$test_password" | chpasswd
fi

# The test user may run anything under sudo, with its password (ussh's --sudo
# tests feed it on sudo's stdin): never NOPASSWD.
sudoers=/etc/sudoers.d/uring-ssh-test
if [ ! -f "$sudoers" ]; then
    mkdir -p /etc/sudoers.d
    chmod 755 /etc/sudoers.d
    tmp=$(mktemp /etc/sudoers.d/.uring-ssh-test.XXXXXX)
    printf 'Defaults:%s !lecture\n%s ALL=(ALL) ALL\n' "$test_user" "$test_user" >"$tmp"
    visudo -cqf "$tmp"
    chmod 440 "$tmp"
    mv "$tmp" "$sudoers"
fi

# cargo: rustup puts it in ~/.cargo/bin.
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-/root}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME:-/root}/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo not found (install Rust, e.g. via rustup)" >&2
    exit 1
fi

# The whole workspace: the library and the ussh tool. Release: some tests
# move 256 MiB. Two test threads (= --test-threads=2) via
# the environment, so "$@" may carry its own `-- <libtest args>`.
RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}" cargo test --release --workspace "$@"

# The integration tests once more on the reactor's poll engine, the
# fallback where io_uring cannot run (the unit tests cover both engines).
URING_SSH_BACKEND=poll RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}" \
    cargo test --release --workspace --test '*' "$@"
