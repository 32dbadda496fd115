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

/// A missing or wrong path in any device option is refused the same way before the VM starts:
/// exit 2 and one sentence naming the option, the path and the fix.
#[test]
fn every_bad_device_path_is_refused_before_the_vm_starts() {
    let dir = scratch_dir("cli-paths");
    let kernel = write_file(&dir, "tiny.elf", &elf_kernel(&[0xf4]));
    let kernel = kernel.to_str().unwrap();
    let odd = write_file(&dir, "odd.img", &[0u8; 4096]);
    let odd = odd.to_str().unwrap();
    let cases: [(&str, String, &str); 9] = [
        ("--disk", "path=/nonexistent.img".into(), "error: --disk path=/nonexistent.img cannot be opened for writing"),
        ("--pmem", "path=/nonexistent".into(), "error: --pmem path=/nonexistent cannot be opened"),
        ("--pmem", format!("path={odd},readonly=on"), "is 4096 bytes; its size must be a non-zero multiple of 2 MiB"),
        (
            "--vsock",
            "cid=3,uds=/nonexistent/dir/v.sock".into(),
            "error: --vsock uds=/nonexistent/dir/v.sock: the directory /nonexistent/dir does not exist; create it",
        ),
        (
            "--device",
            "vfio-user=/nonexistent.sock".into(),
            "error: --device vfio-user=/nonexistent.sock cannot be reached (No such file or directory (os error 2)); \
             start the device's vfio-user server first",
        ),
        ("--device", format!("vfio={odd}"), "is not a directory; give a device's directory under /sys/bus/pci/devices"),
        ("--net", "switch=/nonexistent.sock".into(), "start `ferrovisor switch /nonexistent.sock` first."),
        ("--serial", "file:/nonexistent/dir/out".into(), "error: --serial file:/nonexistent/dir/out: the directory"),
        ("--console", "file:/nonexistent/dir/out".into(), "error: --console file:/nonexistent/dir/out: the directory"),
    ];
    for (option, value, expected) in cases {
        assert_usage_error(&["run", "--kernel", kernel, option, &value], expected);
    }
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
    // With a limit, the file stops growing there however much the guest writes.
    let out = common::run(
        &["run", "--kernel", common::probe_elf(), "--memory", "64", "--serial", &serial, "--output-limit", "100"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.describe());
    let written = std::fs::read(&log).unwrap();
    assert_eq!(written.len(), 100, "{}", String::from_utf8_lossy(&written));
    assert!(written.starts_with(b"PROBE start"));
    // Only a regular file is written: a device named as the output is refused.
    let out =
        run(&["run", "--kernel", kernel.to_str().unwrap(), "--serial", "file:/dev/null"], Duration::from_secs(30));
    assert!(!out.status.success() && out.stderr.contains("is a character device"), "{}", out.describe());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Firecracker's command line: the flags its users pass are taken, and bad values are refused
/// with a sentence.
#[test]
fn firecrackers_command_line_is_understood() {
    let dir = scratch_dir("cli-firecracker");
    let socket = dir.join("api.sock");
    let socket = socket.to_str().unwrap();
    assert_usage_error(&["--api-sock", socket, "--id", "no/slashes"], "--id 'no/slashes' must be 1 to 64 letters");
    let metadata = dir.join("metadata.json");
    std::fs::write(&metadata, "{not json").unwrap();
    assert_usage_error(&["--api-sock", socket, "--metadata", metadata.to_str().unwrap()], "is not JSON");
    std::fs::write(&metadata, format!(r#"{{"big": "{}"}}"#, "x".repeat(2000))).unwrap();
    assert_usage_error(
        &["--api-sock", socket, "--mmds-size-limit", "1024", "--metadata", metadata.to_str().unwrap()],
        "more than its limit of 1024",
    );
    assert_usage_error(
        &["--api-sock", socket, "--level", "Loud"],
        "--level must be Error, Warning, Info, Debug, Trace or Off",
    );
    assert_usage_error(
        &["--api-sock", socket, "--log-path", "/dev/null"],
        "--log-path /dev/null is a character device; give a regular file or a FIFO.",
    );
    let out = run(&["--snapshot-version"], Duration::from_secs(20));
    assert_eq!(out.stdout.trim(), "v1.0.0", "{}", out.describe());
    let out = run(&["--describe-snapshot", "/etc/hostname"], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("is not a Ferrovisor snapshot"), "{}", out.describe());
    let out = run(&["--version"], Duration::from_secs(20));
    assert_eq!(out.stdout.trim(), format!("ferrovisor {}", env!("CARGO_PKG_VERSION")));

    // A VMM as the jailer starts it: every argument it adds is taken, the API answers with the
    // id, the log goes to --log-path, and metrics to --metrics-path.
    let log = dir.join("vmm.log");
    let metrics = dir.join("metrics.json");
    let mut cmd = common::ferrovisor();
    cmd.args(["--api-sock", socket, "--id", "vm-7", "--start-time-us", "1", "--start-time-cpu-us", "2"])
        .args(["--parent-cpu-time-us", "3", "--boot-timer", "--level", "Warning", "--show-level"])
        .args(["--show-log-origin", "--http-api-max-payload-size", "100", "--log-path", log.to_str().unwrap()])
        .args(["--metrics-path", metrics.to_str().unwrap(), "--enable-pci"]);
    let vm = common::Running::start(cmd);
    common::wait_for_socket(std::path::Path::new(socket));
    let (status, info) = common::http(std::path::Path::new(socket), "GET", "/", "");
    assert_eq!(status, 200);
    assert!(info.contains("\"id\":\"vm-7\""), "{info}");
    let (status, _) = common::http(std::path::Path::new(socket), "PUT", "/machine-config", &" ".repeat(101));
    assert_eq!(status, 413, "--http-api-max-payload-size");
    common::api_call(std::path::Path::new(socket), "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#, 204);
    assert!(std::fs::read_to_string(&metrics).unwrap().contains("\"put_api_requests\""));
    let out = vm.finish_after_signal(libc::SIGTERM, Duration::from_secs(20));
    assert!(out.status.success(), "{}", out.describe());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("WARN") && logged.contains("API error 413"), "{logged}");
    assert!(!logged.contains("INFO"), "--level Warning: {logged}");
    let _ = std::fs::remove_dir_all(dir);
}
