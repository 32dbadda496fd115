//! The virtual firewall on switch ports, with probe guests as IPv4 and IPv6 hosts on an
//! unprivileged `ferrovisor switch`: rules by protocol and port, default policies, stateful replies, rules
//! changed through the API while the VMs run (their counters checked against what the probes
//! counted), anti-spoofing, no rogue DHCP, storm control, and bad rules refused whole; the same
//! guards on a TAP.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Running, probe_command, probe_result, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(60);
const SERVER: &str = "10.0.0.2";

struct Lab {
    dir: PathBuf,
    switch: PathBuf,
}

impl Lab {
    fn new(name: &str) -> (Lab, Running) {
        let dir = scratch_dir(name);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let switch = dir.join("switch.sock");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", env!("CARGO_BIN_EXE_ferrovisor"), "switch"])
            .arg(&switch);
        let running = Running::start(cmd);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !switch.exists() {
            assert!(std::time::Instant::now() < deadline, "the switch never listened: {}", running.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
        (Lab { dir, switch }, running)
    }

    /// A probe at 10.0.0.`host` on the switch, with `firewall` (a file or @NAME) if given, and
    /// an API socket; `ip_args` are its probe.virtio-net parameters.
    fn vm(&self, host: u8, ip_args: &str, firewall: Option<&str>) -> (Running, PathBuf) {
        let socket = self.dir.join(format!("vm{host}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let tests = format!(
            "probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.0.0.{host} \
             probe.virtio-net.prefix=24 probe.virtio-net.wait=1500000000 {}",
            ip_args
                .split_whitespace()
                .map(|a| if a == "idle" { "probe.idle=on".to_string() } else { format!("probe.virtio-net.{a}") })
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut cmd = probe_command(1, &tests);
        let firewall = firewall.map(|f| format!(",firewall={f}")).unwrap_or_default();
        cmd.args([
            "--net",
            &format!("switch={},mac=02:00:00:00:00:{host:02x},ip=10.0.0.{host}{firewall}", self.switch.display()),
        ])
        .arg("--api-sock")
        .arg(&socket);
        (Running::start(cmd), socket)
    }

    fn rules(&self, name: &str, json: serde_json::Value) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, json.to_string()).unwrap();
        path.display().to_string()
    }
}

/// A client run to completion: its result line.
fn client(lab: &Lab, host: u8, args: &str, firewall: Option<&str>) -> String {
    let (vm, _) = lab.vm(host, &format!("gw={SERVER} {args}"), firewall);
    let out = vm.finish(TIMEOUT);
    probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe())).to_string()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("{key} in {line}"))
}

fn report(socket: &Path, iface: &str) -> serde_json::Value {
    serde_json::from_str(&common::api_call(socket, "GET", &format!("/ferrovisor/firewall/{iface}"), "", 200)).unwrap()
}

fn rule_packets(report: &serde_json::Value, name: &str) -> u64 {
    let rules = report["rules"].as_array().unwrap();
    let rule = rules.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("rule {name} in {report}"));
    rule["packets"].as_u64().unwrap()
}

#[test]
fn switch_ports_enforce_rules_statefully_and_guard_against_spoofing() {
    let (lab, switch) = Lab::new("firewall-switch");
    let web =
        serde_json::json!({"name": "web", "direction": "in", "protocol": "tcp", "ports": "7777", "action": "allow"});
    let ping = serde_json::json!({"name": "ping", "direction": "in", "protocol": "icmp", "peer": "10.0.0.0/24", "action": "allow"});
    // The server's rules, stored as a named set.
    let server_rules = lab.rules("server.json", serde_json::json!({"rules": [web, ping]}));
    let state = lab.dir.join("state");
    let status = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["firewall", "create", "server", &server_rules])
        .env("FERROVISOR_STATE_DIR", &state)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    // SAFETY: the test's own environment, set before any thread of this test reads it.
    unsafe { std::env::set_var("FERROVISOR_STATE_DIR", &state) };
    let (mut server, server_api) =
        lab.vm(2, &format!("gw={SERVER} listen=7777 serve=200000000000 checks= tally=on"), Some("@server"));
    assert!(server.wait_for_output("PROBE virtio-net listening port=7777", TIMEOUT), "{}", server.stderr());

    // TCP to the allowed port passes, ICMP as its rule says, UDP meets the default policy; the
    // client's own firewall (default: inbound denied) lets the replies in.
    let allowed =
        client(&lab, 1, "checks=icmp,udp,tcp port=7777", Some(&lab.rules("client.json", serde_json::json!({}))));
    assert!(allowed.contains(" icmp=reply udp=none tcp=open "), "{allowed}");
    // A closed port behind the firewall: no answer at all, where the host would refuse it.
    let denied = client(&lab, 3, "checks=tcp port=7778", None);
    assert!(denied.contains(" tcp=none "), "{denied}");

    // A VM that only connects out: its own connection works, one to it does not.
    let (mut lonely, lonely_api) = lab.vm(
        4,
        &format!("gw={SERVER} checks=tcp port=7777 listen=7777 serve=15000000000"),
        Some(&lab.rules("lonely.json", serde_json::json!({"default_in": "deny"}))),
    );
    assert!(lonely.wait_for_output("PROBE virtio-net listening port=7777", TIMEOUT), "{}", lonely.stdout());
    let inbound = client(&lab, 5, "dst=10.0.0.4 checks=icmp,tcp port=7777", None);
    assert!(inbound.contains(" icmp=none udp=- tcp=none "), "the default policy refused it: {inbound}");
    // A rule put on the running VM takes effect at once; it counts the segments the client
    // sent (SYN, data, RST).
    let open = serde_json::json!({"rules": [{"name": "open", "direction": "in", "protocol": "tcp", "ports": "7777", "action": "allow"}]});
    common::api_call(&lonely_api, "PUT", "/ferrovisor/firewall/net0", &open.to_string(), 204);
    let now_open = client(&lab, 5, "dst=10.0.0.4 checks=tcp port=7777", None);
    assert!(now_open.contains(" tcp=open "), "{now_open}");
    assert_eq!(rule_packets(&report(&lonely_api, "net0"), "open"), 3);
    // Its serving time ends and it reports.
    let lonely = lonely.finish(TIMEOUT);
    let lonely_line = probe_result(&lonely.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", lonely.describe()));
    assert!(lonely_line.contains(" tcp=open "), "its own connection and the replies passed: {lonely_line}");

    // UDP allowed on the running server; then what reaches it is counted by the rule and by
    // the probe alike.
    let echo =
        serde_json::json!({"name": "echo", "direction": "in", "protocol": "udp", "ports": "7777", "action": "allow"});
    let with_echo = serde_json::json!({"rules": [web, ping, echo]});
    common::api_call(&server_api, "PUT", "/ferrovisor/firewall/net0", &with_echo.to_string(), 204);
    let flood = client(&lab, 3, "checks=udp port=7777 flood=40", None);
    assert!(flood.contains(" udp=reply "), "{flood}\n{}\n{}", report(&server_api, "net0"), server.stdout());

    // Forged sources and DHCP server answers reach nobody; the same VM's honest datagram does.
    let (forger, forger_api) = lab.vm(6, &format!("gw={SERVER} checks=udp port=7777 forge=5 rogue=5 idle"), None);
    let forger_report = {
        let mut forger = forger;
        assert!(forger.wait_for_output("PROBE done", TIMEOUT), "{}\nserver: {}", forger.stdout(), server.stdout());
        let r = report(&forger_api, "net0");
        assert!(probe_result(&forger.stdout(), "virtio-net").unwrap().contains(" udp=reply "), "{}", forger.stdout());
        r
    };
    let drops = &forger_report["drops"];
    assert_eq!(
        (drops["spoofed_mac"].as_u64(), drops["spoofed_ip"].as_u64(), drops["rogue_dhcp"].as_u64()),
        (Some(5), Some(5), Some(5)),
        "{forger_report}"
    );

    // A broadcast flood is held to its port's storm-control rate, while a neighbour's
    // traffic goes on.
    let storm_rules = lab.rules("storm.json", serde_json::json!({"default_in": "allow", "storm_pps": 20}));
    let (stormer, stormer_api) =
        lab.vm(7, &format!("gw={SERVER} checks=udp port=7777 flood=300 broadcast=on idle"), Some(&storm_rules));
    let neighbour = client(&lab, 8, "checks=udp port=7777", None);
    assert!(neighbour.contains(" udp=reply "), "{neighbour}");
    let mut stormer = stormer;
    assert!(stormer.wait_for_output("PROBE done", TIMEOUT), "{}", stormer.stdout());
    let storm_drops = report(&stormer_api, "net0")["drops"]["storm_control"].as_u64().unwrap();
    let storm_line = probe_result(&stormer.stdout(), "virtio-net").unwrap().to_string();
    drop(stormer);
    // The flood's own rate says how long it lasted; 20 a second (after a burst of 20) pass,
    // with a second of slack.
    let flood_pps: u64 = field(&storm_line, "flood_pps=").parse().unwrap();
    let passed = 300 - storm_drops;
    assert!(passed <= 20 + 20 * (300 / flood_pps.max(1) + 1), "{passed} passed at {flood_pps} pps: {storm_line}");
    assert!(passed >= 15, "storm control let the burst through: {passed}");

    let server_report = report(&server_api, "net0");
    common::api_call(&server_api, "PUT", "/ferrovisor/stop", "", 204);
    let server = server.finish(TIMEOUT);
    // The server's own count: its last tally line.
    let line = server
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("PROBE virtio-net echoed="))
        .unwrap_or_else(|| panic!("{}", server.describe()));
    let echoed: u64 = field(line, "echoed=").parse().unwrap();
    // 41 from the flood, 1 from the forger's honest datagram, 1 + what passed storm control,
    // and the neighbour's: nothing forged.
    assert_eq!(echoed, 41 + 1 + (1 + 300 - storm_drops) + 1, "{line}\n{server_report}\n{storm_line}");
    assert_eq!(rule_packets(&server_report, "echo"), echoed, "{server_report}");
    drop(switch);
    let _ = std::fs::remove_dir_all(&lab.dir);
}

impl Lab {
    /// A probe as an IPv6 host at 2001:db8::`host` (given to its port with `ip6=`) on the
    /// switch; `ip6_args` are its probe.virtio-net parameters.
    fn vm6(&self, host: u8, ip6_args: &str, firewall: Option<&str>) -> (Running, PathBuf) {
        let socket = self.dir.join(format!("vm6-{host}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let args: Vec<String> = ip6_args
            .split_whitespace()
            .map(|a| if a == "idle" { "probe.idle=on".to_string() } else { format!("probe.virtio-net.{a}") })
            .collect();
        let tests = format!(
            "probe.test=virtio-net probe.virtio-net.mode=ip6 probe.virtio-net.ip6=2001:db8::{host} \
             probe.virtio-net.wait=1500000000 {}",
            args.join(" ")
        );
        let mut cmd = probe_command(1, &tests);
        let firewall = firewall.map(|f| format!(",firewall={f}")).unwrap_or_default();
        cmd.args([
            "--net",
            &format!("switch={},mac=02:00:00:00:06:{host:02x},ip6=2001:db8::{host}{firewall}", self.switch.display()),
        ])
        .arg("--api-sock")
        .arg(&socket);
        (Running::start(cmd), socket)
    }
}

/// The same on IPv6: rules by protocol (icmpv6), port and IPv6 peer, stateful replies, and the
/// guards: a forged source address, router advertisements, neighbour advertisements for
/// another's address and DHCPv6 server answers stop at the sender's port, while neighbour
/// discovery passes the default policy as ARP does.
#[test]
fn switch_ports_enforce_ipv6_rules_and_guards() {
    let (lab, switch) = Lab::new("firewall-switch-ipv6");
    let server_rules = lab.rules(
        "server6.json",
        serde_json::json!({"rules": [
            {"name": "web", "direction": "in", "protocol": "tcp", "ports": "7777", "peer": "2001:db8::/64", "action": "allow"},
            {"name": "ping", "direction": "in", "protocol": "icmpv6", "peer": "2001:db8::/64", "action": "allow"},
            {"name": "v4-only", "direction": "in", "protocol": "udp", "ports": "7777", "peer": "10.0.0.0/8", "action": "allow"}
        ]}),
    );
    let (mut server, server_api) = lab.vm6(2, "listen=7777 serve=200000000000", Some(&server_rules));
    assert!(server.wait_for_output("PROBE virtio-net listening port=7777", TIMEOUT), "{}", server.stderr());

    let client_rules = lab.rules("client6.json", serde_json::json!({}));
    let (client, client_api) =
        lab.vm6(1, "dst6=2001:db8::2 port=7777 forge=3 ra=2 na=2 dhcp=2 idle", Some(&client_rules));
    let mut client = client;
    // The whole result line: the probe says it is done after it.
    assert!(client.wait_for_output("PROBE done", TIMEOUT), "{}", client.stdout());
    let line = probe_result(&client.stdout(), "virtio-net").unwrap().to_string();
    // ND found the server through both default policies; echo and TCP pass their rules and
    // come back as replies; UDP meets the server's default (its rule is for IPv4 peers).
    assert!(line.contains(" peer=nd icmp=reply udp=none tcp=open "), "{line}");
    let drops = &report(&client_api, "net0")["drops"];
    assert_eq!(drops["spoofed_ip"], 3, "forged sources: {drops}");
    assert_eq!(drops["rogue_router_advert"], 2, "{drops}");
    assert_eq!(drops["spoofed_neighbor_advert"], 2, "{drops}");
    assert_eq!(drops["rogue_dhcp"], 2, "{drops}");
    let server_report = report(&server_api, "net0");
    assert_eq!(rule_packets(&server_report, "ping"), 1, "{server_report}");
    assert_eq!(rule_packets(&server_report, "v4-only"), 0, "{server_report}");
    assert!(server_report["drops"]["default_policy"].as_u64().unwrap() >= 1, "the UDP datagram: {server_report}");
    assert!(
        server_report["flows"].as_array().unwrap().iter().any(|f| f["remote"] == "[2001:db8::1]:40001"),
        "the TCP flow, keyed by IPv6 addresses: {server_report}"
    );
    drop(client);
    drop(server);
    drop(switch);
}

#[test]
fn bad_rules_are_refused_whole_with_the_rule_and_field_named() {
    let (lab, _switch) = Lab::new("firewall-bad");
    let good = lab.rules("good.json", serde_json::json!({"rules": [{"name": "ssh", "direction": "in", "protocol": "tcp", "ports": "22", "action": "allow"}]}));
    for (file, text, needle) in [
        ("broken.json", "{\"rules\": [", "is not a valid rules file"),
        (
            "proto.json",
            r#"{"rules": [{"name": "x", "direction": "in", "protocol": "gre", "action": "allow"}]}"#,
            "rule 1 (x) protocol 'gre' is unknown",
        ),
        (
            "ports.toml",
            "[[rules]]\nname = \"r\"\ndirection = \"in\"\nprotocol = \"udp\"\nports = \"90-80\"\naction = \"allow\"\n",
            "rule 1 (r) ports '90-80' runs backwards",
        ),
        (
            "cidr.json",
            r#"{"rules": [{"direction": "out", "protocol": "any", "peer": "300.0.0.0/8", "action": "deny"}]}"#,
            "rule 1 (rule1) peer '300.0.0.0/8' is not an IPv4",
        ),
    ] {
        let path = lab.dir.join(file);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
            .args(["run", "--kernel", common::probe_elf(), "--net"])
            .arg(format!("switch={},firewall={}", lab.switch.display(), path.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(needle), "{file}: {stderr}");
    }
    // Through the API, on a running VM: refused with a sentence, the old rules untouched.
    let (vm, api) = lab.vm(2, "gw=10.0.0.2 checks= listen=7777 serve=100000000000", Some(&good));
    let mut vm = vm;
    assert!(vm.wait_for_output("PROBE virtio-net listening", TIMEOUT), "{}", vm.stderr());
    for (body, needle) in [
        (
            r#"{"rules": [{"direction": "in", "protocol": "tcp", "ports": "80", "action": "allow"}, {"direction": "in", "protocol": "tcp", "ports": "9-1", "action": "allow"}]}"#,
            "rule 2 (rule2) ports '9-1' runs backwards",
        ),
        (
            r#"{"rules": [{"direction": "in", "protocol": "tcp", "peer": "10.0.0.0/40", "action": "allow"}]}"#,
            "prefix length",
        ),
        (r#"{"rules": [{"direction": "sideways", "protocol": "tcp", "action": "allow"}]}"#, "direction"),
        (r#"{"rules": {}}"#, "rules"),
    ] {
        let answer = common::api_call(&api, "PUT", "/ferrovisor/firewall/net0", body, 400);
        assert!(answer.contains(needle), "{body}: {answer}");
    }
    let unknown = common::api_call(&api, "PUT", "/ferrovisor/firewall/net9", "{}", 400);
    assert!(unknown.contains("no network interface net9"), "{unknown}");
    let now = report(&api, "net0");
    assert_eq!(now["rules"].as_array().unwrap().len(), 1, "{now}");
    assert_eq!(now["rules"][0]["name"], "ssh", "{now}");
    let show = Command::new(env!("CARGO_BIN_EXE_ferrovisor")).args(["firewall", "show"]).arg(&api).output().unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success() && shown.contains("ssh") && shown.contains("anti-spoofing on"), "{shown}");
    common::api_call(&api, "PUT", "/ferrovisor/stop", "", 204);
    assert!(vm.finish(TIMEOUT).status.success());
}

/// A nat network `name` on `subnet` in the lab, and a scratch directory for the test.
fn nat_network(lab: &common::NetLab, name: &str, subnet: &str, scratch: &str) -> PathBuf {
    let created = lab.network(&["create", name, "--mode", "nat", "--subnet", subnet, "--uplink", "vh"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    scratch_dir(scratch)
}

/// Writes a rules file; its path.
fn write_rules(dir: &Path, name: &str, json: serde_json::Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, json.to_string()).unwrap();
    path.display().to_string()
}

/// The packets the kernel's copy of a port's rules dropped by its inbound default policy, and
/// the chain as nft lists it.
fn kernel_default_in_drops(lab: &common::NetLab, table: &str) -> (u64, String) {
    let kernel = lab.host_sh("nft", &["list", "chain", "netdev", table, "rules_in"]);
    let dropped = kernel
        .lines()
        .find(|l| l.contains("comment \"default in\""))
        .and_then(|l| l.split("packets ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{kernel}"));
    (dropped, kernel)
}

/// The same rules on a nat network's ports, where the kernel enforces them too (the port's
/// nftables table) before the VMM does: the server takes TCP on its one open port and nothing
/// else, until a rule put on the running VM lets UDP in, in both copies; the client's own
/// default policy refuses inbound traffic but lets in the replies to its connections, to its
/// neighbour and through the gateway to the outside.
#[test]
fn nat_network_ports_enforce_rules_and_keep_state() {
    let lab = common::NetLab::new("fvfw");
    let dir = nat_network(&lab, "lab", "10.81.0.0/24", "firewall-nat");
    let write = |name: &str, json: serde_json::Value| write_rules(&dir, name, json);
    let server_rules = write(
        "server.json",
        serde_json::json!({"rules": [{"name": "web", "direction": "in", "protocol": "tcp", "ports": "9", "action": "allow"}]}),
    );
    let client_rules = write("client.json", serde_json::json!({}));
    let vm = |ip: &str, dst: &str, rules: &str, extra: &str, socket: Option<&Path>| {
        let cmdline = format!(
            "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip={ip} \
             probe.virtio-net.gw=10.81.0.1 probe.virtio-net.dst={dst} probe.virtio-net.wait=2000000000 {extra}"
        );
        let mut cmd = lab.ferrovisor();
        cmd.args(["run", "--kernel", common::probe_elf(), "--memory", "64", "--cmdline", &cmdline])
            .args(["--net", &format!("network=lab,ip={ip},firewall={rules}")]);
        if let Some(socket) = socket {
            cmd.arg("--api-sock").arg(socket);
        }
        Running::start(cmd)
    };
    let server_api = dir.join("server.sock");
    let mut server = vm(
        "10.81.0.20",
        "10.81.0.1",
        &server_rules,
        "probe.virtio-net.checks=icmp probe.virtio-net.listen=9 probe.virtio-net.serve=20000000000",
        Some(&server_api),
    );
    assert!(server.wait_for_output("PROBE virtio-net listening port=9", TIMEOUT), "{}", server.stdout());
    let result = |vm: Running| {
        let out = vm.finish(TIMEOUT);
        probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe())).to_string()
    };
    let to_server = result(vm("10.81.0.10", "10.81.0.20", &client_rules, "probe.virtio-net.port=9", None));
    assert!(to_server.contains("peer=arp icmp=none udp=none tcp=open"), "{to_server}");
    // A port the server's rules do not open: silence, where the host would refuse with RST.
    let closed = result(vm(
        "10.81.0.10",
        "10.81.0.20",
        &client_rules,
        "probe.virtio-net.checks=tcp probe.virtio-net.port=10",
        None,
    ));
    assert!(closed.contains(" tcp=none "), "{closed}");
    let outside = result(vm("10.81.0.10", "192.0.2.1", &client_rules, "", None));
    assert!(outside.contains("icmp=reply udp=reply tcp=open"), "replies pass the client's firewall: {outside}");
    let report = report(&server_api, "net0");
    assert_eq!(rule_packets(&report, "web"), 3, "{report}");
    // The kernel dropped the ping and the datagram before the VMM saw them.
    let table = format!("fv_fv{}n0", server.child.id());
    let (dropped, kernel) = kernel_default_in_drops(&lab, &table);
    assert!(dropped >= 3, "{kernel}");
    // None of the probes' traffic reached the VMM's own default policy (multicast listener
    // reports from the host side pass both copies of the rules, as neighbour discovery does).
    assert!(!server.stderr().contains("firewall: dropped In proto"), "{report}\n{}", server.stderr());
    // UDP let in on the running VM: both copies of the rules change at once.
    let with_udp = serde_json::json!({"rules": [
        {"name": "web", "direction": "in", "protocol": "tcp", "ports": "9", "action": "allow"},
        {"name": "echo", "direction": "in", "protocol": "udp", "ports": "9", "action": "allow"},
    ]});
    common::api_call(&server_api, "PUT", "/ferrovisor/firewall/net0", &with_udp.to_string(), 204);
    std::thread::sleep(Duration::from_millis(300));
    let kernel = lab.host_sh("nft", &["list", "chain", "netdev", &table, "rules_in"]);
    assert!(kernel.contains("comment \"echo\""), "the keeper applied the update: {kernel}");
    let udp = result(vm(
        "10.81.0.10",
        "10.81.0.20",
        &client_rules,
        "probe.virtio-net.checks=udp probe.virtio-net.port=9",
        None,
    ));
    assert!(udp.contains(" udp=reply "), "{udp}");
    common::api_call(&server_api, "PUT", "/ferrovisor/stop", "", 204);
    let server = server.finish(TIMEOUT);
    assert!(server.stdout.contains("PROBE virtio-net listening"), "{}", server.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// IPv6 between two VMs on a managed network: both copies of the rules (the kernel's table on
/// each TAP and the VMM's) let neighbour discovery pass, open the flows the rules allow and let
/// their replies back, and the kernel drops what the rules do not allow before the VMM sees it.
#[test]
fn nat_network_ports_enforce_ipv6_rules_in_the_kernel_too() {
    let lab = common::NetLab::new("fvfw6");
    let dir = nat_network(&lab, "lab6", "10.82.0.0/24", "firewall-nat-ipv6");
    let write = |name: &str, json: serde_json::Value| write_rules(&dir, name, json);
    let server_rules = write(
        "server.json",
        serde_json::json!({"rules": [
            {"name": "web", "direction": "in", "protocol": "tcp", "ports": "9", "peer": "fd00:82::/64", "action": "allow"},
            {"name": "ping", "direction": "in", "protocol": "icmpv6", "action": "allow"}
        ]}),
    );
    let client_rules = write("client.json", serde_json::json!({}));
    let vm = |host: u8, rules: &str, extra: &str, socket: Option<&Path>| {
        let cmdline = format!(
            "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip6 probe.virtio-net.ip6=fd00:82::{host} \
             probe.virtio-net.wait=2000000000 {extra}"
        );
        let mut cmd = lab.ferrovisor();
        cmd.args(["run", "--kernel", common::probe_elf(), "--memory", "64", "--cmdline", &cmdline])
            .args(["--net", &format!("network=lab6,ip6=fd00:82::{host},firewall={rules}")]);
        if let Some(socket) = socket {
            cmd.arg("--api-sock").arg(socket);
        }
        Running::start(cmd)
    };
    let server_api = dir.join("server.sock");
    let mut server =
        vm(20, &server_rules, "probe.virtio-net.listen=9 probe.virtio-net.serve=20000000000", Some(&server_api));
    assert!(server.wait_for_output("PROBE virtio-net listening port=9", TIMEOUT), "{}", server.stdout());
    let out = vm(10, &client_rules, "probe.virtio-net.dst6=fd00:82::20 probe.virtio-net.port=9", None).finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe())).to_string();
    assert!(line.contains(" peer=nd icmp=reply udp=none tcp=open "), "{line}");
    let report = report(&server_api, "net0");
    assert_eq!(rule_packets(&report, "web"), 2, "the SYN and the RST: {report}");
    // The kernel dropped the datagram before the VMM saw it.
    let table = format!("fv_fv{}n0", server.child.id());
    let (dropped, kernel) = kernel_default_in_drops(&lab, &table);
    assert!(dropped >= 1, "{kernel}");
    assert_eq!(report["drops"]["default_policy"], 0, "{report}");
    common::api_call(&server_api, "PUT", "/ferrovisor/stop", "", 204);
    let _ = server.finish(TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}

/// User-mode networking: the guest's flows meet the same rules. Outbound UDP is
/// denied by a rule while ICMP and TCP to the host pass with their replies, and a connection
/// through a forwarded port is refused by the default inbound policy.
#[test]
fn user_mode_networking_applies_the_rules_to_the_guests_flows() {
    use std::io::Read;
    let dir = scratch_dir("firewall-user");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rules]]\nname = \"no-udp\"\ndirection = \"out\"\nprotocol = \"udp\"\naction = \"deny\"\n",
    )
    .unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut conn, _) = tcp.accept().unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut line = [0u8; 17];
        conn.read_exact(&mut line).map(|()| line.to_vec()).unwrap_or_default()
    });
    // A UDP echo server on the same port number: were a datagram to get out, it would answer.
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let udp_seen = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        match udp.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = udp.send_to(&buf[..n], from);
                n
            }
            Err(_) => 0,
        }
    });
    let forwarded = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cmdline = format!(
        "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.0.2.15 \
         probe.virtio-net.gw=10.0.2.2 probe.virtio-net.port={port} probe.virtio-net.wait=1500000000 \
         probe.virtio-net.listen=8080 probe.virtio-net.serve=8000000000"
    );
    let mut cmd = common::ferrovisor();
    cmd.args(["run", "--kernel", common::probe_elf(), "--memory", "64", "--cmdline", &cmdline])
        .args(["--net", &format!("user,hostfwd=tcp:127.0.0.1:{forwarded}-:8080,firewall={}", rules.display())]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE virtio-net listening port=8080", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    assert_eq!(accepted.join().unwrap(), b"ferrovisor-probe\n", "the guest's connection to the host passed");
    // The forwarded port connects on the host side, but nothing reaches the guest: its
    // firewall drops the SYN, and the host's connection gets no data back.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", forwarded)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    std::io::Write::write_all(&mut client, b"hello, guest\n").unwrap();
    let mut echo = [0u8; 13];
    assert!(client.read_exact(&mut echo).is_err(), "the guest echoed through its firewall");
    let out = vm.finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.contains("icmp=reply udp=none tcp=open served=0"), "{line}");
    assert_eq!(udp_seen.join().unwrap(), 0, "a datagram left the guest despite its rule");
    let _ = std::fs::remove_dir_all(dir);
}

/// A managed-network port's guards are in the kernel too, in an nftables table of the port's
/// own bound to its TAP, from the moment it joins; a SIGKILL of the VMM leaves no table behind
/// (a keeper process deletes it when the VMM is gone).
#[test]
fn a_managed_ports_guards_are_kernel_rules_that_go_with_the_vmm_even_on_sigkill() {
    let lab = common::NetLab::new("fvgd");
    let created = lab.network(&["create", "lab", "--mode", "isolated", "--subnet", "10.82.0.0/24"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let cmdline = "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.82.0.7 \
                   probe.virtio-net.gw=10.82.0.1 probe.virtio-net.checks=icmp probe.virtio-net.listen=9 \
                   probe.virtio-net.serve=100000000000";
    let mut cmd = lab.ferrovisor();
    cmd.args(["run", "--kernel", common::probe_elf(), "--memory", "64", "--cmdline", cmdline])
        .args(["--net", "network=lab,ip=10.82.0.7,mac=02:00:00:00:82:07"]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE virtio-net listening", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    // The VMM runs in the lab's namespace through `ip netns exec`, which execs it: its pid
    // names the TAP.
    let table = format!("fv_fv{}n0", vm.child.id());
    let rules = lab.host_sh("nft", &["list", "table", "netdev", &table]);
    for line in [
        "ether saddr != 02:00:00:00:82:07 counter",
        "ip saddr != { 0.0.0.0, 10.82.0.7 } counter",
        "udp sport 67 counter",
        "limit rate over 1000/second",
    ] {
        assert!(rules.contains(line), "{line}: {rules}");
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGKILL) };
    let _ = vm.finish(TIMEOUT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.host_sh("nft", &["list", "tables"]).contains(&table) {
        assert!(std::time::Instant::now() < deadline, "{table} outlived its VMM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guards on a TAP port whose rule set asks for them: 300-byte DHCP server answers and
/// forged sources never reach the TAP, and the VM's honest datagram does.
#[test]
fn a_tap_port_with_guards_stops_forged_frames_and_dhcp_answers() {
    let tap = common::TestTap::new("fvzc");
    common::sh("ip", &["addr", "add", "10.77.0.9/24", "dev", &tap.name]);
    // A TAP is the user's own: its guards come on with a rule set that asks for them.
    let dir = scratch_dir("tap-guards");
    let rules = dir.join("guards.json");
    std::fs::write(&rules, r#"{"default_in": "allow", "anti_spoofing": true}"#).unwrap();
    let far_side = common::PacketSocket::bind(&tap.name);
    far_side.set_timeout(Duration::from_secs(2));
    let tests = "probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.77.0.5 \
                 probe.virtio-net.gw=10.77.0.5 probe.virtio-net.dst=10.77.0.9 probe.virtio-net.prefix=24 \
                 probe.virtio-net.checks=udp probe.virtio-net.forge=3 probe.virtio-net.rogue=3 \
                 probe.virtio-net.wait=1000000000";
    let mut cmd = probe_command(1, tests);
    cmd.args(["--net", &format!("tap={},ip=10.77.0.5,firewall={}", tap.name, rules.display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.contains(" peer=arp"), "the host answered ARP: {line}");
    assert!(out.stderr.contains("(rogue_dhcp)"), "{}", out.describe());
    let (mut honest, mut rogue, mut forged) = (0, 0, 0);
    while let Some(frame) = far_side.recv_ethertype(0x0800) {
        let udp_to_probe_port = frame.len() >= 42 && frame[23] == 17 && frame[36..38] == 7777u16.to_be_bytes();
        if !udp_to_probe_port {
            continue;
        }
        match (u16::from_be_bytes([frame[34], frame[35]]), &frame[6..12], &frame[26..30]) {
            (67, ..) => rogue += 1,
            (_, [0x02, 0x66, 0x66, 0x66, 0x66, 0x66], _) => forged += 1,
            (_, _, [10, 77, 0, 5]) => honest += 1,
            _ => forged += 1,
        }
    }
    assert_eq!((honest, rogue, forged), (1, 0, 0), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}
