#!/usr/bin/env bash
# Runs every test: unit tests, CLI tests, hand-made guests, the probe guest (also under QEMU
# microvm) and Linux boots. Builds the Linux guest first (cached after the first run, about 6
# minutes on 2 cores) and installs QEMU and cargo-nextest when they are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v qemu-system-x86_64 >/dev/null; then
	echo "installing qemu-system-x86 (the probe is also checked under QEMU microvm)" >&2
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
fi
FERROVISOR_GUEST_DIR=$(guest/build.sh | tail -n 1)
export FERROVISOR_GUEST_DIR
if ! cargo nextest --version >/dev/null 2>&1; then
	echo "installing cargo-nextest" >&2
	cargo install --locked cargo-nextest
fi
exec cargo nextest run --workspace --profile ci "$@"
