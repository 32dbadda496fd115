#!/usr/bin/env bash
# Builds the Linux test guest (cached) and Ferrovisor, then boots the guest with its serial
# console on this terminal. Extra arguments go to `ferrovisor run` (e.g. --cpus 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
guest=$(guest/build.sh | tail -n 1)
cargo build --release --quiet
# Settings for hosts whose KVM emulates the guest's ring 0 (nested kvm_pvm); harmless elsewhere.
host_options="noxsave clearcpuid=popcnt,cx16,rdrand,rdseed,serialize,smap mitigations=off tsc=reliable 8250.nr_uarts=1"
exec target/x86_64-unknown-linux-gnu/release/ferrovisor run \
	--kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio" --memory 256 \
	--cmdline "console=ttyS0 reboot=k panic=-1 $host_options" "$@"
