#!/usr/bin/env bash
# Runs every test: unit tests, CLI tests, hand-made guests, the probe guest (also under QEMU
# microvm) and Linux boots. Builds the Linux guest first (cached after the first run, about 6
# minutes on 2 cores) and installs what the tests need when it is missing (QEMU, dnsmasq,
# ping, nftables, curl, the OpenAPI validator, cargo-nextest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# QEMU checks the probe; dnsmasq and ping are the far side of the Linux guest's network.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# vhost-user back-ends the front-ends are tested with: virtiofsd and qemu-storage-daemon.
[ -x /usr/lib/qemu/virtiofsd ] || missing+=(qemu-system-common)
command -v qemu-storage-daemon >/dev/null || missing+=(qemu-system-common)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
command -v ping >/dev/null || missing+=(iputils-ping)
command -v ip >/dev/null || missing+=(iproute2)
command -v bridge >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v setfacl >/dev/null || missing+=(acl)
# strace watches a disk flush reach the host (fdatasync) in the virtio-blk tests.
command -v strace >/dev/null || missing+=(strace)
# curl is the plain HTTP client of the API tests; pip fetches the OpenAPI validator.
command -v curl >/dev/null || missing+=(curl)
command -v pip3 >/dev/null || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing ${missing[*]}" >&2
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
validator=~/.cache/ferrovisor/openapi-validator
if [ ! -d "$validator" ]; then
	echo "installing openapi-spec-validator (PyPI) into $validator" >&2
	pip3 install -q --disable-pip-version-check --target "$validator.tmp" --root-user-action=ignore openapi-spec-validator
	mv "$validator.tmp" "$validator"
fi
FERROVISOR_GUEST_DIR=$(guest/build.sh | tail -n 1)
export FERROVISOR_GUEST_DIR
# What this script installs, the tests may count on: a missing tool is a failure, not a skip.
export FERROVISOR_TEST_SCRIPT=1
if ! cargo nextest --version >/dev/null 2>&1; then
	echo "installing cargo-nextest" >&2
	cargo install --locked cargo-nextest
fi
exec cargo nextest run --workspace --profile ci "$@"
