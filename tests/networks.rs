//! Managed networks, with probe guests that speak ICMP, UDP and TCP: nat, routed and isolated
//! networks, port isolation, clean-up after a SIGKILL, and the errors of `network create`.
//! Everything happens inside network namespaces the tests make: a "host" one where
//! Ferrovisor runs and an "outside" one with a server (see common::NetLab).

mod common;

use std::time::Duration;

use common::{NetLab, Running, probe_elf, probe_result};

const TIMEOUT: Duration = Duration::from_secs(60);

fn created(lab: &NetLab, args: &[&str]) {
    let out = lab.network(args);
    assert!(out.status.success(), "network {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A probe on `network` that tries ICMP, UDP and TCP against `dst` from `ip`.
fn ip_probe(lab: &NetLab, net: &str, ip: &str, gw: &str, dst: &str, extra: &str) -> Running {
    let cmdline = format!(
        "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip={ip} \
         probe.virtio-net.gw={gw} probe.virtio-net.dst={dst} probe.virtio-net.wait=2000000000 {extra}"
    );
    let mut cmd = lab.ferrovisor();
    cmd.args(["run", "--kernel", probe_elf(), "--memory", "64", "--net", net, "--cmdline", &cmdline]);
    Running::start(cmd)
}

fn result(vm: Running) -> String {
    let out = vm.finish(TIMEOUT);
    probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe())).to_string()
}

#[test]
fn nat_network_translates_the_guests_traffic_and_lets_replies_back() {
    let lab = NetLab::new("fvnat");
    created(&lab, &["create", "lab", "--mode", "nat", "--subnet", "10.77.0.0/24", "--uplink", "vh"]);
    let list = String::from_utf8_lossy(&lab.network(&["list"]).stdout).into_owned();
    assert!(
        list.contains("lab") && list.contains("nat") && list.contains("10.77.0.0/24") && list.ends_with("ok\n"),
        "{list}"
    );
    let line = result(ip_probe(&lab, "network=lab", "10.77.0.50", "10.77.0.1", "192.0.2.1", ""));
    assert!(line.contains("icmp=reply udp=reply tcp=open"), "{line}");
    // The server saw the uplink's address, not the guest's.
    let saw = lab.server_saw();
    assert!(saw.contains("udp 192.0.2.2") && saw.contains("tcp 192.0.2.2") && !saw.contains("10.77."), "{saw}");
    // The rules are in a table of the network's own, gone with the network.
    let rules = lab.host_sh("nft", &["list", "table", "ip", "ferrovisor_lab"]);
    assert!(rules.contains("masquerade"), "{rules}");
    created(&lab, &["delete", "lab"]);
    assert!(!lab.host_sh("nft", &["list", "ruleset"]).contains("ferrovisor_lab"));
    assert!(!lab.host_sh("ip", &["link"]).contains("fv-lab"));
}

#[test]
fn routed_network_keeps_the_guests_own_address() {
    let lab = NetLab::new("fvrt");
    created(&lab, &["create", "lab", "--mode", "routed", "--subnet", "10.78.0.0/24", "--uplink", "vh"]);
    // The outside knows the way back to the routed subnet.
    common::sh("ip", &["-n", &lab.outside.name, "route", "add", "10.78.0.0/24", "via", "192.0.2.2"]);
    let line = result(ip_probe(&lab, "network=lab", "10.78.0.9", "10.78.0.1", "192.0.2.1", ""));
    assert!(line.contains("icmp=reply udp=reply tcp=open"), "{line}");
    let saw = lab.server_saw();
    assert!(saw.contains("udp 10.78.0.9") && saw.contains("tcp 10.78.0.9"), "{saw}");
}

#[test]
fn isolated_network_joins_guests_and_gateway_but_forwards_nothing() {
    let lab = NetLab::new("fviso");
    created(&lab, &["create", "lab", "--mode", "isolated", "--subnet", "10.79.0.0/24"]);
    // B answers pings and serves TCP on port 9 while A tries it, the gateway and the outside.
    let b = ip_probe(
        &lab,
        "network=lab",
        "10.79.0.20",
        "10.79.0.1",
        "10.79.0.1",
        "probe.virtio-net.checks=icmp probe.virtio-net.listen=9 probe.virtio-net.serve=12000000000",
    );
    std::thread::sleep(Duration::from_secs(1));
    let to_peer = ip_probe(
        &lab,
        "network=lab",
        "10.79.0.10",
        "10.79.0.1",
        "10.79.0.20",
        "probe.virtio-net.checks=icmp,tcp probe.virtio-net.port=9",
    );
    let to_peer = result(to_peer);
    assert!(to_peer.contains("peer=arp icmp=reply udp=- tcp=open"), "{to_peer}");
    let b = result(b);
    assert!(b.contains("icmp=reply"), "the gateway answers: {b}");
    assert!(b.contains("served=17"), "B echoed A's line: {b}");
    let outside = result(ip_probe(
        &lab,
        "network=lab",
        "10.79.0.10",
        "10.79.0.1",
        "192.0.2.1",
        "probe.virtio-net.checks=icmp,udp",
    ));
    assert!(outside.contains("icmp=none udp=none"), "nothing leaves an isolated network: {outside}");
    assert_eq!(lab.server_saw(), "", "the outside saw nothing");
}

#[test]
fn isolated_ports_cannot_reach_each_other_but_reach_the_gateway() {
    let lab = NetLab::new("fvport");
    created(&lab, &["create", "lab", "--mode", "nat", "--subnet", "10.80.0.0/24", "--uplink", "vh"]);
    let b = ip_probe(
        &lab,
        "network=lab,isolated=on",
        "10.80.0.20",
        "10.80.0.1",
        "10.80.0.1",
        "probe.virtio-net.checks=icmp probe.virtio-net.listen=9 probe.virtio-net.serve=8000000000",
    );
    std::thread::sleep(Duration::from_secs(1));
    let a = result(ip_probe(
        &lab,
        "network=lab,isolated=on",
        "10.80.0.10",
        "10.80.0.1",
        "10.80.0.20",
        "probe.virtio-net.checks=icmp,tcp probe.virtio-net.port=9",
    ));
    let b = result(b);
    assert!(a.contains("peer=none"), "A cannot even resolve B: {a}");
    assert!(b.contains("icmp=reply"), "B reaches the gateway: {b}");
    assert!(b.contains("served=0 others=0"), "not one frame from A reached B: {b}");
    // Both still reach the outside through the gateway.
    let c = result(ip_probe(
        &lab,
        "network=lab,isolated=on",
        "10.80.0.10",
        "10.80.0.1",
        "192.0.2.1",
        "probe.virtio-net.checks=icmp",
    ));
    assert!(c.contains("icmp=reply"), "{c}");
}

#[test]
fn a_killed_vmm_leaves_no_tap_and_deleting_the_network_leaves_nothing() {
    let lab = NetLab::new("fvkill");
    created(&lab, &["create", "lab", "--mode", "nat", "--subnet", "10.81.0.0/24", "--uplink", "vh"]);
    let mut vm = ip_probe(
        &lab,
        "network=lab",
        "10.81.0.10",
        "10.81.0.1",
        "10.81.0.1",
        "probe.virtio-net.checks=icmp probe.virtio-net.listen=9",
    );
    assert!(vm.wait_for_output("PROBE virtio-net listening", TIMEOUT), "{}", vm.stderr());
    let show = String::from_utf8_lossy(&lab.network(&["show", "lab"]).stdout).into_owned();
    let attached: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(attached["ports"].as_array().unwrap().len(), 1, "{show}");
    assert!(lab.network(&["delete", "lab"]).stderr.starts_with(b"error: network lab still has VMs attached"));
    // ip netns exec runs the VMM as a child: kill the VMM itself, by its TAP's pid.
    let tap = attached["ports"][0].as_str().unwrap().to_string();
    let pid: i32 = tap.trim_start_matches("fv").split('n').next().unwrap().parse().unwrap();
    // SAFETY: signalling the VMM the test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = vm.finish(TIMEOUT);
    assert!(!lab.host_sh("ip", &["link"]).contains(&tap), "the kernel removed the TAP with its VMM");
    let show: serde_json::Value = serde_json::from_slice(&lab.network(&["show", "lab"]).stdout).unwrap();
    assert_eq!(show["ports"], serde_json::json!([]));
    assert_eq!(show["problems"], serde_json::json!([]));
    let dhcp_pid = show["dhcp_pid"].as_u64().unwrap();
    // As after a host reboot: the bridge and the DHCP server gone, the definition kept.
    // SAFETY: stopping the DHCP server this test's network started.
    unsafe { libc::kill(dhcp_pid as i32, libc::SIGTERM) };
    lab.host_sh("ip", &["link", "del", "fv-lab"]);
    std::thread::sleep(Duration::from_millis(700));
    let refused = lab.ferrovisor().args(["run", "--kernel", probe_elf(), "--net", "network=lab"]).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("its bridge fv-lab is missing") && err.contains("ferrovisor network start lab"), "{err}");
    created(&lab, &["start", "lab"]);
    let line =
        result(ip_probe(&lab, "network=lab", "10.81.0.10", "10.81.0.1", "192.0.2.1", "probe.virtio-net.checks=icmp"));
    assert!(line.contains("icmp=reply"), "the network works again: {line}");
    let show: serde_json::Value = serde_json::from_slice(&lab.network(&["show", "lab"]).stdout).unwrap();
    assert_eq!(show["problems"], serde_json::json!([]), "{show}");
    let dhcp_pid = show["dhcp_pid"].as_u64().unwrap();
    created(&lab, &["delete", "lab"]);
    let links = lab.host_sh("ip", &["-o", "link"]);
    assert!(!links.contains("fv-lab") && !links.contains(&tap), "{links}");
    assert!(!lab.host_sh("nft", &["list", "ruleset"]).contains("ferrovisor"));
    // Gone, or a zombie its parent has yet to reap: either way it no longer runs.
    let stat = std::fs::read_to_string(format!("/proc/{dhcp_pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "the DHCP server stopped: {stat}");
    assert!(lab.network(&["list"]).stdout.is_empty());
}

#[test]
fn network_create_refuses_mistakes_and_leaves_nothing_half_made() {
    let lab = NetLab::new("fverr");
    let fails = |args: &[&str], says: &str| {
        let out = lab.network(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says) && err.trim_end().ends_with('.'), "{args:?}: {err}");
    };
    fails(&["create", "lab", "--mode", "nat", "--uplink", "nosuch0"], "the uplink nosuch0 does not exist");
    fails(
        &["create", "lab", "--mode", "nat", "--subnet", "192.0.2.0/25", "--uplink", "vh"],
        "overlaps 192.0.2.0/24 of interface vh",
    );
    fails(&["create", "Lab!", "--mode", "isolated"], "must be 1 to 12 lowercase letters");
    fails(&["create", "lab", "--mode", "bridge"], "give --uplink");
    created(&lab, &["create", "lab", "--mode", "isolated", "--subnet", "10.82.0.0/24"]);
    fails(&["create", "lab", "--mode", "isolated", "--subnet", "10.83.0.0/24"], "already exists");
    fails(
        &["create", "two", "--mode", "isolated", "--subnet", "10.82.0.128/25"],
        "overlaps 10.82.0.0/24 of network lab",
    );
    // Without root: refused before anything is touched.
    let out = lab
        .host
        .command("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", env!("CARGO_BIN_EXE_ferrovisor")])
        .args(["network", "create", "user", "--mode", "isolated", "--subnet", "10.84.0.0/24"])
        .env("FERROVISOR_STATE_DIR", &lab.state)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("run it as root"), "{out:?}");
    // A bad uplink made nothing: only lab's bridge exists.
    let links = lab.host_sh("ip", &["-o", "link"]);
    assert_eq!(links.matches("fv-").count(), 1, "{links}");
    let unknown = lab.ferrovisor().args(["run", "--kernel", probe_elf(), "--net", "network=nosuch"]).output().unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("there is no network 'nosuch'"), "{unknown:?}");
}

/// The host programs Ferrovisor runs to put a VM on a network (`ip`, `sysctl`, `bridge`) get
/// stdin, stdout and stderr and nothing else: no eventfd, KVM fd or TAP of the VMM's.
#[test]
fn helper_programs_see_only_stdin_stdout_and_stderr() {
    let lab = NetLab::new("fvfds");
    created(&lab, &["create", "lab", "--mode", "isolated", "--subnet", "10.79.0.0/24"]);
    let real_ip =
        String::from_utf8(std::process::Command::new("sh").args(["-c", "command -v ip"]).output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
    let wrappers = lab.state.join("wrappers");
    std::fs::create_dir_all(&wrappers).unwrap();
    let log = lab.state.join("fds.log");
    // The wrapper lists its fds (its listing takes the lowest free one, 3) and runs the real ip.
    let wrapper = format!(
        "#!/usr/bin/python3\nimport os, sys\nfds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n\
         open('{}', 'a').write(' '.join(map(str, fds)) + ' | ' + ' '.join(sys.argv[1:]) + '\\n')\nos.execv('{real_ip}', ['ip'] + sys.argv[1:])\n",
        log.display()
    );
    let ip = wrappers.join("ip");
    std::fs::write(&ip, wrapper).unwrap();
    std::fs::set_permissions(&ip, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The check can fail: a process that holds an inheritable fd passes it on to the wrapper.
    let leaky =
        std::process::Command::new("sh").args(["-c", &format!("exec 7</dev/null; {} -V", ip.display())]).output();
    assert!(leaky.unwrap().status.success());
    assert!(std::fs::read_to_string(&log).unwrap().lines().next().unwrap().contains('7'));
    std::fs::write(&log, "").unwrap();

    let path = format!("{}:{}", wrappers.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = lab.ferrovisor();
    cmd.env("PATH", path).args(["run", "--kernel", probe_elf(), "--memory", "64", "--net", "network=lab"]);
    cmd.args(["--disk", &format!("path={}", lab.state.join("disk.img").display()), "--rng"]);
    std::fs::write(lab.state.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    cmd.args(["--cmdline", "probe.test=smp"]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    // The test's own `ip netns exec` (which starts Ferrovisor) is left out.
    let seen = std::fs::read_to_string(&log).unwrap();
    let by_ferrovisor: Vec<&str> = seen.lines().filter(|l| !l.contains("| netns exec")).collect();
    assert!(by_ferrovisor.iter().any(|l| l.contains("| link set")), "Ferrovisor ran no ip through the wrapper: {seen}");
    for line in by_ferrovisor {
        assert!(line.starts_with("0 1 2 3 | "), "a helper inherited more than stdio: {line}");
    }
}

/// Network names are checked wherever one is read, and a definition file's fields before they
/// reach a command or an nftables script.
#[test]
fn network_names_and_definitions_are_checked_before_use() {
    let state = common::scratch_dir("net-names");
    let networks = state.join("networks");
    std::fs::create_dir_all(&networks).unwrap();
    let ferrovisor = |args: &[&str]| {
        let out = common::ferrovisor().env("FERROVISOR_STATE_DIR", &state).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for args in [
        &["network", "show", "../../etc/passwd"][..],
        &["network", "delete", "a\"b"],
        &["network", "start", "UPPER"],
        &["run", "--kernel", probe_elf(), "--net", "network=../x"],
    ] {
        let (code, stderr) = ferrovisor(args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(stderr.contains("must be 1 to 12 lowercase letters, digits or dashes"), "{args:?}: {stderr}");
    }
    // A definition whose bridge would smuggle rules into nftables.
    let evil = r#"{"name": "evil", "mode": "isolated", "subnet": {"address": "10.9.9.0", "prefix": 24},
                   "uplink": null, "dhcp": false,
                   "bridge": "br\" accept }\n table ip x { chain y {", "owns_bridge": true}"#;
    std::fs::write(networks.join("evil.json"), evil).unwrap();
    let (code, stderr) = ferrovisor(&["network", "show", "evil"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("is damaged: its bridge") && stderr.contains("is not an interface name"), "{stderr}");
    let _ = std::fs::remove_dir_all(state);
}
