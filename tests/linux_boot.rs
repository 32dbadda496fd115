//! Boots the project's Linux guest (guest/build.sh). Each boot costs about 30 s of one core on
//! hosts that emulate the guest's ring 0; nextest runs at most two of them at once.

mod common;

use std::time::Duration;

use common::{LINUX_HOST_CMDLINE, Running, ferrovisor, linux_guest};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn linux_vmlinux_boots_to_init_and_a_panic_reboot_exits_0() {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE}");
    let mut cmd = ferrovisor();
    cmd.arg("run")
        .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--initrd", guest.join("initramfs.cpio").to_str().unwrap()])
        .args(["--memory", "256", "--cmdline", &cmdline]);
    let out = Running::start(cmd).finish(BOOT_TIMEOUT);
    let log = out.describe();
    assert!(out.stdout.contains("Linux version 6.1"), "{log}");
    // 256 MiB requested: usable RAM from 1 MiB to 256 MiB - 1, as the e820 map says.
    assert!(out.stdout.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"), "{log}");
    assert!(out.stdout.contains("MPTABLE: OEM ID: FERROVSR"), "{log}");
    assert!(out.stdout.contains("Run /init as init process"), "{log}");
    // User space cannot make system calls on emulating hosts: init dies, the kernel panics and
    // panic=-1 reboots at once. On hardware /init runs and reboots. Both end in an i8042 reset.
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(out.stderr.contains("the guest requested a reset"), "{log}");
    eprintln!("vmlinux: launch to exit {:.1} s", out.elapsed.as_secs_f64());
}

#[test]
fn linux_bzimage_boots_and_sigterm_stops_the_vm_cleanly() {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE}");
    let mut cmd = ferrovisor();
    cmd.arg("run").args(["--kernel", guest.join("bzImage").to_str().unwrap()]).args([
        "--memory",
        "128",
        "--cmdline",
        &cmdline,
    ]);
    let mut vm = Running::start(cmd);
    // 128 MiB requested: the last line of the e820 map, printed a little after the banner.
    let e820_ram = "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable";
    let reached = vm.wait_for_output(e820_ram, BOOT_TIMEOUT);
    let pid = vm.child.id() as i32;
    // SAFETY: signalling a child process this test started and has not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = vm.finish(Duration::from_secs(30));
    let log = out.describe();
    assert!(reached, "the bzImage never printed its memory map: {log}");
    assert!(out.stdout.contains("Linux version 6.1"), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(out.stderr.contains("stopped the VM on signal 15 (SIGTERM)"), "{log}");
}

#[test]
fn linux_mounts_its_root_from_virtio_blk_and_seeds_crng_from_virtio_rng() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-virtio");
    // A panicked read-write mount leaves a journal to recover: each boot gets a fresh copy.
    let root = dir.join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    let before = std::fs::read(&root).unwrap();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/vda rw");
    let mut cmd = ferrovisor();
    cmd.arg("run")
        .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--memory", "256", "--rng", "--cmdline", &cmdline])
        .args(["--disk", &format!("path={}", root.display())]);
    let out = Running::start(cmd).finish(BOOT_TIMEOUT);
    let log = out.describe();
    assert!(out.stdout.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"), "{log}");
    assert!(out.stdout.contains("virtio_blk virtio0: [vda] 32768 512-byte logical blocks"), "{log}");
    assert!(out.stdout.contains("EXT4-fs (vda): mounted filesystem"), "{log}");
    assert!(out.stdout.contains("random: crng init done"), "{log}");
    assert!(out.stdout.contains("Run /sbin/init as init process"), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
    // The read-write mount wrote to the disk (superblock mount state and times).
    assert_ne!(std::fs::read(&root).unwrap(), before, "the guest's writes reached the image");
    let _ = std::fs::remove_dir_all(dir);
}
