//! Ferrovisor's user-space switch, run as an unprivileged user, with probe guests plugged in:
//! frames reach ports of the same VLAN exactly, and never a port of another VLAN.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{Running, probe_command, probe_result, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(30);

fn probe_on(switch: &str, vlan: u16, tests: &str, mac: Option<&str>) -> Running {
    let mut cmd = probe_command(1, tests);
    let mac = mac.map(|m| format!(",mac={m}")).unwrap_or_default();
    cmd.args(["--net", &format!("switch={switch},vlan={vlan}{mac}")]);
    Running::start(cmd)
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn switch_without_root_forwards_within_a_vlan_and_never_across() {
    let dir = scratch_dir("switch");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.join("switch.sock");
    let socket_str = socket.to_str().unwrap().to_string();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        env!("CARGO_BIN_EXE_ferrovisor"),
        "switch",
        &socket_str,
    ]);
    let switch = Running::start(cmd);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "the switch never listened: {}", switch.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", switch.child.id())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(!uid.split_whitespace().skip(1).any(|id| id == "0"), "the switch runs without root: {uid}");

    let mut same = probe_on(&socket_str, 1, "probe.test=virtio-net probe.virtio-net.tx=0 probe.virtio-net.rx=4", None);
    let mut other = probe_on(
        &socket_str,
        2,
        "probe.test=virtio-net probe.virtio-net.tx=0 probe.virtio-net.rx=1 probe.virtio.timeout=3000000000",
        None,
    );
    assert!(same.wait_for_output("PROBE virtio-net ready", TIMEOUT), "{}", same.stdout());
    assert!(other.wait_for_output("PROBE virtio-net ready", TIMEOUT), "{}", other.stdout());
    let sender = probe_on(&socket_str, 1, "probe.test=virtio-net probe.virtio-net.tx=4", Some("02:00:00:00:00:0a"))
        .finish(TIMEOUT);
    let sent = probe_result(&sender.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", sender.describe()));
    let same = same.finish(TIMEOUT);
    let got = probe_result(&same.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", same.describe()));
    assert_eq!(field(got, "rx="), "4", "{got}");
    assert_eq!(field(got, "rx_bytes="), field(sent, "tx_bytes="), "{got} / {sent}");
    assert_eq!(field(got, "rx_checksum="), field(sent, "tx_checksum="), "the frames arrive intact: {got} / {sent}");
    let other = other.finish(TIMEOUT);
    assert_eq!(probe_result(&other.stdout, "virtio-net"), Some("PROBE virtio-net FAIL frames did not arrive"));

    // SAFETY: signalling our own child (setpriv execs the switch, so the pid is the switch's).
    unsafe { libc::kill(switch.child.id() as i32, libc::SIGTERM) };
    let switch = switch.finish(TIMEOUT);
    assert!(switch.status.success(), "{}", switch.describe());
    // Per-port counters as the ports left: nothing was sent to the other VLAN's port.
    assert!(
        switch.stderr.contains("switch: port vlan=2 left: rx_frames=0 tx_frames=0 dropped=0"),
        "{}",
        switch.describe()
    );
    assert!(
        switch.stderr.contains("switch: port vlan=1 left: rx_frames=0 tx_frames=4 dropped=0"),
        "{}",
        switch.describe()
    );
    assert!(!socket.exists(), "the switch removed its socket");
    let _ = std::fs::remove_dir_all(dir);
}
