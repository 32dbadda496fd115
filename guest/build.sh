#!/usr/bin/env bash
# Builds Ferrovisor's Linux test guest from Debian packages alone:
#   kernel    linux-source-6.1: allnoconfig + guest/kernel.config (a microVM config)
#   userland  busybox-static, packed as an initramfs and as a 16 MiB ext4 rootfs
#
# The kernel is cached in ~/.cache/ferrovisor/guest/kernel-<key>, keyed on kernel.config, the
# source package version and the patch below; the full guest in ~/.cache/ferrovisor/guest/<key>,
# keyed on that and on this script. A second run with nothing changed returns at once. The
# symlink ~/.cache/ferrovisor/guest/current points at the newest build, and the last line this
# script prints on stdout is its path. It holds:
#   vmlinux            uncompressed ELF with a PVH note: boot this one
#   bzImage            the same kernel, compressed (Linux boot protocol)
#   initramfs.cpio     busybox /init that prints GUEST-UP and reboots (uncompressed: on hosts
#                      that emulate the guest's ring 0, gunzip alone adds about a minute)
#   rootfs.ext4        the same userland on ext4
#   config, VERSIONS   the kernel .config and the package versions used
#
# Usage: guest/build.sh        Env: JOBS (default: nproc), NICE (default: 10)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE=${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor}/guest
WORK="$CACHE/work"
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-10}
KSRC_PKG=linux-source-6.1
APT_PKGS=("$KSRC_PKG" build-essential bc bison flex libelf-dev libssl-dev xz-utils
	busybox-static cpio e2fsprogs lz4)
# Bump when the kernel recipe in build_kernel changes.
KERNEL_RECIPE=1

log() { printf '[guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
	local missing=() p
	for p in "${APT_PKGS[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return
	[ "$(id -u)" = 0 ] || die "packages ${missing[*]} are missing; run this as root or apt-get install them"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build_kernel() {
	local out=$1 tarball=/usr/src/linux-source-6.1.tar.xz src="$WORK/linux-source-6.1" bld="$WORK/kbuild"
	[ -f "$tarball" ] || die "$tarball is missing although $KSRC_PKG is installed"
	if [ ! -f "$src/.unpacked" ]; then
		log "unpacking $tarball"
		rm -rf "$src"
		tar -C "$WORK" -xJf "$tarball"
		touch "$src/.unpacked"
	fi
	# The boot-time INT3 self-test kills the guest on hosts whose KVM emulates ring 0 and cannot
	# execute INT3 there; it is only a self-test, so skipping it costs nothing on real hardware.
	if grep -q '^	int3_selftest();$' "$src/arch/x86/kernel/alternative.c"; then
		log "patching out int3_selftest()"
		sed -i 's/^\tint3_selftest();$/\tif (0) int3_selftest(); \/* skipped: emulated ring 0 cannot run INT3 *\//' \
			"$src/arch/x86/kernel/alternative.c"
	fi
	rm -rf "$bld"
	mkdir -p "$bld"
	log "configuring the kernel (allnoconfig + kernel.config)"
	make -s -C "$src" O="$bld" ARCH=x86_64 allnoconfig >/dev/null
	"$src/scripts/kconfig/merge_config.sh" -m -O "$bld" "$bld/.config" "$HERE/kernel.config" >/dev/null 2>&1
	make -s -C "$src" O="$bld" ARCH=x86_64 olddefconfig >/dev/null 2>&1
	local opt want have bad=0
	while IFS='=' read -r opt want; do
		case "$opt" in CONFIG_*) ;; *) continue ;; esac
		have=$(grep -E "^$opt=" "$bld/.config" | cut -d= -f2- || true)
		[ -n "$have" ] || have=n
		[ "$want" = "$have" ] || { log "config: $opt wanted $want, got $have"; bad=1; }
	done <"$HERE/kernel.config"
	[ $bad = 0 ] || die "the kernel config did not come out as kernel.config asks"

	log "building vmlinux and bzImage with -j$JOBS (about 6 minutes on 2 cores)"
	local t0=$SECONDS pid
	nice -n "$NICE" make -C "$src" O="$bld" ARCH=x86_64 -j"$JOBS" vmlinux bzImage >"$WORK/kbuild.log" 2>&1 &
	pid=$!
	while kill -0 $pid 2>/dev/null; do
		sleep 20
		kill -0 $pid 2>/dev/null || break
		log "kernel build: $(grep -c '^  CC' "$WORK/kbuild.log" || true) files compiled, $((SECONDS - t0)) s"
	done
	wait $pid || { tail -30 "$WORK/kbuild.log" >&2; die "the kernel build failed (log: $WORK/kbuild.log)"; }
	log "kernel built in $((SECONDS - t0)) s"
	mkdir -p "$out.tmp"
	cp "$bld/vmlinux" "$bld/arch/x86/boot/bzImage" "$out.tmp/"
	cp "$bld/.config" "$out.tmp/config"
	rm -rf "$out" && mv "$out.tmp" "$out"
	rm -rf "$bld"
}

# Userland for the initramfs and the rootfs. Few applets: each syscall is costly on emulated hosts.
make_userland() {
	local root=$1 applet
	rm -rf "$root"
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root,mnt,run}
	cp /bin/busybox "$root/bin/busybox"
	for applet in sh mount umount poweroff reboot cat echo ls dmesg uname ip ifconfig mkdir sleep; do
		ln -s busybox "$root/bin/$applet"
	done
	ln -s ../bin/busybox "$root/sbin/init"
	# Ends with a reboot, not a power-off: with reboot=k the VMM sees the i8042 reset and exits 0.
	cat >"$root/init" <<'INIT'
#!/bin/busybox sh
echo "GUEST-UP (init started)"
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo "GUEST-UP $up"
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
echo "kernel: $(/bin/busybox uname -r)  cpus: $(/bin/busybox grep -c ^processor /proc/cpuinfo)"
case " $(cat /proc/cmdline) " in
*" guest.shell "*) exec /bin/busybox sh ;;
esac
/bin/busybox reboot -f
INIT
	chmod 755 "$root/init"
}

build_userland() {
	local out=$1
	make_userland "$WORK/initramfs-root"
	log "packing the initramfs"
	(cd "$WORK/initramfs-root" && find . -print | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
		>"$out/initramfs.cpio"
	make_userland "$WORK/rootfs-root"
	log "creating rootfs.ext4"
	mkfs.ext4 -q -F -L guestroot -E root_owner=0:0 -d "$WORK/rootfs-root" "$out/rootfs.ext4" 16M >&2
}

install_packages
mkdir -p "$WORK"
ksrc_version=$(dpkg-query -W -f='${Version}' "$KSRC_PKG")
kernel_key=$( (cat "$HERE/kernel.config"; echo "$ksrc_version recipe=$KERNEL_RECIPE") | sha256sum | cut -c1-16)
guest_key=$( (echo "$kernel_key"; cat "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)
kernel_dir="$CACHE/kernel-$kernel_key"
out="$CACHE/$guest_key"

if [ ! -f "$out/.complete" ]; then
	[ -f "$kernel_dir/vmlinux" ] || build_kernel "$kernel_dir"
	rm -rf "$out" && mkdir -p "$out"
	cp "$kernel_dir/vmlinux" "$kernel_dir/bzImage" "$kernel_dir/config" "$out/"
	build_userland "$out"
	for p in "$KSRC_PKG" busybox-static e2fsprogs gcc-12 binutils; do
		printf '%s %s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo unknown)"
	done >"$out/VERSIONS"
	touch "$out/.complete"
	log "built the guest in $out"
else
	log "the guest is up to date in $out"
fi
ln -sfn "$guest_key" "$CACHE/current"
echo "$out"
