#!/usr/bin/env bash
# Runs every test: unit tests, CLI tests, hand-made guests and Linux boots. Builds the Linux
# guest first (cached after the first run, about 6 minutes on 2 cores) and installs
# cargo-nextest if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FERROVISOR_GUEST_DIR=$(guest/build.sh | tail -n 1)
export FERROVISOR_GUEST_DIR
if ! cargo nextest --version >/dev/null 2>&1; then
	echo "installing cargo-nextest" >&2
	cargo install --locked cargo-nextest
fi
exec cargo nextest run --workspace --profile ci "$@"
