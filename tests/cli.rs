//! Bad command lines: each gets one sentence naming the problem and exit status 2, before any
//! VM is created.

mod common;

use std::time::Duration;

use common::{elf_kernel, run, scratch_dir, write_file};

fn assert_usage_error(args: &[&str], expected: &str) {
    let out = run(args, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    let message = out.stderr.trim();
    assert!(message.contains(expected), "expected '{expected}' in: {}", out.describe());
    assert_eq!(message.lines().count(), 1, "one line: {}", out.describe());
    assert!(out.stdout.is_empty(), "{}", out.describe());
}

#[test]
fn bad_arguments_are_named_with_a_fix_and_exit_2() {
    let dir = scratch_dir("cli");
    let kernel = write_file(&dir, "tiny.elf", &elf_kernel(&[0xf4]));
    let kernel = kernel.to_str().unwrap();
    let script = write_file(&dir, "script.sh", b"#!/bin/sh\necho not a kernel\n");
    let script = script.to_str().unwrap();

    assert_usage_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "error: --kernel /nonexistent/vmlinux does not exist; pass the path of a vmlinux or bzImage.",
    );
    assert_usage_error(
        &["run", "--kernel", script],
        &format!("error: --kernel {script} is neither an ELF vmlinux nor a bzImage; pass a Linux kernel image."),
    );
    assert_usage_error(
        &["run", "--kernel", kernel, "--memory", "0"],
        "error: --memory must be at least 2 MiB, not 0; give the VM more memory.",
    );
    assert_usage_error(
        &["run", "--kernel", kernel, "--memory", "100000000"],
        "error: --memory 100000000 MiB is more than this host's",
    );
    assert_usage_error(&["run", "--kernel", kernel, "--cpus", "0"], "error: --cpus must be between 1 and ");
    assert_usage_error(&["run", "--kernel", kernel, "--cpus", "100000"], "on this host, not 100000.");
    assert_usage_error(
        &["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        "error: --initrd /nonexistent/initrd does not exist or cannot be read",
    );
    let out = run(&["run", "--kernel", kernel, "--serial", "tcp:1"], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.starts_with("error: invalid value 'tcp:1' for '--serial <SERIAL>': use stdio, file:PATH or none"),
        "{}",
        out.describe()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_kernel_option_and_unknown_flags_are_refused_by_the_parser() {
    for args in [&["run"][..], &["run", "--kernel", "/x", "--no-such-flag"], &["fly"]] {
        let out = run(args, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(2), "{}", out.describe());
        assert!(out.stderr.starts_with("error:"), "{}", out.describe());
    }
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = scratch_dir("serial-file");
    // mov dx, 0x3f8 ; mov al, 'F' ; out dx, al ; mov al, 0xfe ; out 0x64, al ; hlt
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'F', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4];
    let kernel = write_file(&dir, "tiny.elf", &elf_kernel(&code));
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let out = run(
        &["run", "--kernel", kernel.to_str().unwrap(), "--memory", "16", "--serial", &serial],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "F");
    assert!(out.stdout.is_empty(), "{}", out.describe());
    std::fs::remove_dir_all(dir).unwrap();
}
