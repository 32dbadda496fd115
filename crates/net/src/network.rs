//! Managed networks: a definition kept as JSON in a state directory, realized as a Linux
//! bridge, an address on it, nftables rules in a table of its own and a DHCP server.
//!
//! - nat: a private subnet behind the bridge's address, masqueraded out of the uplink; only
//!   return traffic comes in.
//! - routed: the subnet is routed through the uplink, addresses unchanged.
//! - isolated: VMs reach each other and the bridge's address; nothing is forwarded.
//! - bridge: VMs join the uplink's L2 segment (an existing bridge, or a bridge made around the
//!   uplink interface).
//!
//! The host is changed with `ip`, `bridge`, `nft` and `sysctl`, as an administrator would; a
//! step that fails undoes the ones before it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Nat,
    Routed,
    Isolated,
    Bridge,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nat" => Ok(Mode::Nat),
            "routed" => Ok(Mode::Routed),
            "isolated" => Ok(Mode::Isolated),
            "bridge" => Ok(Mode::Bridge),
            _ => Err(format!("--mode takes nat, routed, isolated or bridge, not '{s}'")),
        }
    }
}

/// An IPv4 subnet: address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    fn mask(self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.mask())
    }
    /// The first host address: the gateway.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }
    pub fn last_host(self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.network()) | !self.mask()) - 1)
    }
    pub fn overlaps(self, other: Subnet) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.address) & mask == u32::from(other.address) & mask
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--subnet takes an IPv4 network like 10.0.5.0/24 (prefix 8 to 30), not '{s}'");
        let (address, prefix) = s.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        Ok(Subnet { address, prefix })
    }
}

/// A network's definition, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub mode: Mode,
    /// None in bridge mode: the segment has its own addressing.
    pub subnet: Option<Subnet>,
    pub uplink: Option<String>,
    pub dhcp: bool,
    /// The bridge VMs' TAPs join.
    pub bridge: String,
    /// Whether Ferrovisor made the bridge (and deletes it with the network).
    pub owns_bridge: bool,
    /// The DHCP server's process, while it runs.
    #[serde(default)]
    pub dhcp_pid: Option<u32>,
}

/// What `ferrovisor network create` asks for.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub name: String,
    pub mode: Mode,
    pub subnet: Option<Subnet>,
    pub uplink: Option<String>,
    pub dhcp: Option<bool>,
}

/// Where definitions live: `FERROVISOR_STATE_DIR`, else /var/lib/ferrovisor.
pub fn state_dir() -> PathBuf {
    std::env::var_os("FERROVISOR_STATE_DIR").map_or_else(|| PathBuf::from("/var/lib/ferrovisor"), PathBuf::from)
}

fn networks_dir() -> PathBuf {
    state_dir().join("networks")
}

fn definition_path(name: &str) -> PathBuf {
    networks_dir().join(format!("{name}.json"))
}

pub fn leases_path(name: &str) -> PathBuf {
    networks_dir().join(format!("{name}.leases.json"))
}

/// The nftables table of a network.
fn table(name: &str) -> String {
    format!("ferrovisor_{}", name.replace('-', "_"))
}

fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").exists()
}

/// Runs a host command; the error is its stderr.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = sandbox::helper_command(program)
        .args(args)
        .output()
        .map_err(|e| format!("`{program}` cannot run ({e}); install iproute2 and nftables"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Runs an nftables script; the error carries nft's message.
pub(crate) fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = sandbox::helper_command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("`nft` cannot run ({e}); install nftables"))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nftables refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Checks a network name wherever one is read: it names files and an nftables table.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 12
        || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("the network name '{name}' must be 1 to 12 lowercase letters, digits or dashes"));
    }
    Ok(())
}

/// Checks an interface name before it goes into a command or an nftables script.
fn check_interface(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!("{what} '{name}' is not an interface name (letters, digits, '-', '_', '.', at most 15)"));
    }
    Ok(())
}

/// Loads a network's definition; its fields are checked, since they reach commands and
/// nftables scripts.
pub fn load(name: &str) -> Result<Network, String> {
    check_name(name)?;
    let path = definition_path(name);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        format!(
            "there is no network '{name}' (in {}); create it with `ferrovisor network create {name}`",
            networks_dir().display()
        )
    })?;
    let network: Network = serde_json::from_str(&text)
        .map_err(|e| format!("the definition {} is damaged ({e}); delete and create it again", path.display()))?;
    let damaged = |e: String| format!("the definition {} is damaged: {e}; delete and create it again", path.display());
    if network.name != name {
        return Err(damaged(format!("it names network '{}'", network.name)));
    }
    check_interface("its bridge", &network.bridge).map_err(damaged)?;
    if let Some(uplink) = &network.uplink {
        check_interface("its uplink", uplink).map_err(damaged)?;
    }
    Ok(network)
}

fn save(network: &Network) -> Result<(), String> {
    std::fs::create_dir_all(networks_dir())
        .map_err(|e| format!("the state directory {} cannot be made ({e})", networks_dir().display()))?;
    let text = serde_json::to_string_pretty(network).map_err(|e| e.to_string())?;
    std::fs::write(definition_path(&network.name), text + "\n").map_err(|e| e.to_string())
}

pub fn list() -> Vec<Network> {
    let mut all: Vec<Network> = std::fs::read_dir(networks_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().strip_suffix(".json")?.to_string();
            (!name.ends_with(".leases")).then(|| load(&name).ok()).flatten()
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The interface of the default route, the usual uplink.
fn default_route_interface() -> Option<String> {
    let out = sandbox::helper_command("ip").args(["-4", "route", "show", "default"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "dev")?;
    words.next().map(str::to_string)
}

/// The IPv4 networks configured on this host's interfaces.
fn host_subnets() -> Vec<(String, Subnet)> {
    let Ok(out) = sandbox::helper_command("ip").args(["-o", "-4", "addr", "show"]).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let interface = words.nth(1)?.to_string();
            words.find(|w| *w == "inet")?;
            Some((interface, words.next()?.parse().ok()?))
        })
        .collect()
}

/// A free /24 among 10.210.0.0/16 for a network without --subnet.
fn pick_subnet(taken: &[Subnet]) -> Option<Subnet> {
    (0..=255u8)
        .map(|n| Subnet { address: Ipv4Addr::new(10, 210, n, 0), prefix: 24 })
        .find(|s| !taken.iter().any(|t| t.overlaps(*s)))
}

/// Host changes made so far, undone in reverse if a later one fails.
#[derive(Default)]
struct Undo(Vec<Vec<String>>);

impl Undo {
    fn push(&mut self, program: &str, args: &[&str]) {
        let mut step = vec![program.to_string()];
        step.extend(args.iter().map(|a| a.to_string()));
        self.0.push(step);
    }
    fn run(self) {
        for step in self.0.into_iter().rev() {
            let args: Vec<&str> = step[1..].iter().map(String::as_str).collect();
            let _ = run(&step[0], &args);
        }
    }
}

/// Checks the request, realizes the network on the host and stores it. Nothing is left
/// behind when it fails.
pub fn create(
    options: CreateOptions,
    dhcp_command: impl FnOnce(&Network) -> Result<u32, String>,
) -> Result<Network, String> {
    let name = &options.name;
    check_name(name)?;
    if let Some(uplink) = &options.uplink {
        check_interface("--uplink", uplink)?;
    }
    if definition_path(name).exists() {
        return Err(format!("a network '{name}' already exists; delete it first or pick another name"));
    }
    if !is_root() {
        return Err(
            "creating a network changes the host's interfaces and firewall; run it as root (or with CAP_NET_ADMIN)"
                .into(),
        );
    }
    let uplink = match (options.mode, &options.uplink) {
        (Mode::Isolated, Some(_)) => return Err("an isolated network has no uplink; drop --uplink".into()),
        (Mode::Isolated, None) => None,
        (_, Some(uplink)) => Some(uplink.clone()),
        (Mode::Nat | Mode::Routed, None) => Some(
            default_route_interface().ok_or("this host has no default route to take as uplink; give --uplink IFACE")?,
        ),
        (Mode::Bridge, None) => {
            return Err("a bridge network joins an existing segment; give --uplink BRIDGE_OR_IFACE".into());
        }
    };
    if let Some(uplink) = &uplink
        && !interface_exists(uplink)
    {
        return Err(format!("the uplink {uplink} does not exist on this host; give an existing interface to --uplink"));
    }
    let subnet = match (options.mode, options.subnet) {
        (Mode::Bridge, Some(_)) => {
            return Err("a bridge network takes its addresses from its segment; drop --subnet".into());
        }
        (Mode::Bridge, None) => None,
        (_, subnet) => {
            let others: Vec<(String, Subnet)> = list()
                .into_iter()
                .filter_map(|n| Some((format!("network {}", n.name), n.subnet?)))
                .chain(host_subnets().into_iter().map(|(i, s)| (format!("interface {i}"), s)))
                .collect();
            let subnet = match subnet {
                Some(s) => s,
                None => pick_subnet(&others.iter().map(|o| o.1).collect::<Vec<_>>())
                    .ok_or("no free /24 in 10.210.0.0/16; give --subnet")?,
            };
            if let Some((owner, theirs)) = others.iter().find(|(_, s)| s.overlaps(subnet)) {
                return Err(format!("the subnet {subnet} overlaps {theirs} of {owner}; pick another --subnet"));
            }
            Some(subnet)
        }
    };
    let dhcp = options.dhcp.unwrap_or(options.mode != Mode::Bridge);
    if dhcp && subnet.is_none() {
        return Err("a bridge network's segment has its own DHCP; drop --dhcp on".into());
    }
    let (bridge, owns_bridge) = match (&uplink, options.mode) {
        (Some(u), Mode::Bridge) if is_bridge(u) => (u.clone(), false),
        _ => (format!("fv-{name}"), true),
    };
    if owns_bridge && interface_exists(&bridge) {
        return Err(format!("the interface {bridge} already exists; delete it or pick another network name"));
    }
    std::fs::create_dir_all(networks_dir())
        .map_err(|e| format!("the state directory {} cannot be made ({e})", networks_dir().display()))?;
    let mut network =
        Network { name: name.clone(), mode: options.mode, subnet, uplink, dhcp, bridge, owns_bridge, dhcp_pid: None };
    let mut undo = Undo::default();
    // The DHCP server reads the definition, so it is saved first, then again with its pid.
    match realize(&network, &mut undo).and_then(|()| save(&network)).and_then(|()| {
        if network.dhcp {
            network.dhcp_pid = Some(dhcp_command(&network)?);
        }
        save(&network)
    }) {
        Ok(()) => Ok(network),
        Err(e) => {
            if let Some(pid) = network.dhcp_pid {
                kill(pid);
            }
            undo.run();
            let _ = std::fs::remove_file(definition_path(name));
            Err(e)
        }
    }
}

fn realize(n: &Network, undo: &mut Undo) -> Result<(), String> {
    let br = n.bridge.as_str();
    if n.owns_bridge {
        run("ip", &["link", "add", br, "type", "bridge"])?;
        undo.push("ip", &["link", "del", br]);
        // IPv6 off: the bridge stays quiet on the VMs' segment.
        let _ = run("sysctl", &["-qw", &format!("net.ipv6.conf.{br}.disable_ipv6=1")]);
        run("ip", &["link", "set", br, "up"])?;
    }
    if let Some(subnet) = n.subnet {
        run("ip", &["addr", "add", &format!("{}/{}", subnet.gateway(), subnet.prefix), "dev", br])?;
    }
    if n.mode == Mode::Bridge && n.owns_bridge {
        let uplink = n.uplink.as_deref().expect("bridge mode has an uplink");
        run("ip", &["link", "set", uplink, "master", br])?;
        undo.push("ip", &["link", "set", uplink, "nomaster"]);
        run("ip", &["link", "set", uplink, "up"])?;
    }
    let table = table(&n.name);
    let uplink = n.uplink.as_deref().unwrap_or("");
    let subnet = n.subnet.map(|s| s.to_string()).unwrap_or_default();
    // Forwarding: what may pass between the bridge and the uplink; anything else to or from
    // the bridge is dropped.
    let forward = |allowed: &[String]| {
        let mut chain =
            String::from("  chain forward {\n    type filter hook forward priority filter; policy accept;\n");
        // Between two ports of the bridge (seen here when br_netfilter is loaded): VM to VM.
        chain.push_str(&format!("    iifname \"{br}\" oifname \"{br}\" accept\n"));
        for rule in allowed {
            chain.push_str(&format!("    {rule}\n"));
        }
        chain.push_str(&format!("    iifname \"{br}\" drop\n    oifname \"{br}\" drop\n  }}\n"));
        chain
    };
    let outbound = format!("iifname \"{br}\" oifname \"{uplink}\" ip saddr {subnet} accept");
    let rules = match n.mode {
        Mode::Nat => format!(
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n    ip saddr {subnet} oifname \"{uplink}\" masquerade\n  }}\n{}",
            forward(&[outbound, format!("iifname \"{uplink}\" oifname \"{br}\" ct state established,related accept")])
        ),
        Mode::Routed => forward(&[outbound, format!("iifname \"{uplink}\" oifname \"{br}\" ip daddr {subnet} accept")]),
        Mode::Isolated => forward(&[]),
        Mode::Bridge => String::new(),
    };
    if !rules.is_empty() {
        nft(&format!("table ip {table} {{\n{rules}}}\n"))?;
        undo.push("nft", &["delete", "table", "ip", &table]);
    }
    if matches!(n.mode, Mode::Nat | Mode::Routed) {
        run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    }
    Ok(())
}

fn kill(pid: u32) {
    // The pid is checked first: a stale one may belong to another process by now.
    if process_is_dhcp_server(pid) {
        // SAFETY: a plain signal to our own DHCP server; kill(2) touches no memory of ours.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
}

/// Whether `pid` is a `ferrovisor network dhcp` process.
fn process_is_dhcp_server(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.windows(2).any(|w| w[0] == b"network" && w[1] == b"dhcp")
        })
        .unwrap_or(false)
}

/// The TAPs attached to a network's bridge now.
pub fn ports(network: &Network) -> Vec<String> {
    let dir = Path::new("/sys/class/net").join(&network.bridge).join("brif");
    let mut ports: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|p| Some(p.as_str()) != network.uplink.as_deref())
        .collect();
    ports.sort();
    ports
}

/// Realizes a defined network again where it is missing (after a host reboot, say): its
/// bridge, address and rules, and its DHCP server.
pub fn start(name: &str, dhcp_command: impl FnOnce(&Network) -> Result<u32, String>) -> Result<Network, String> {
    if !is_root() {
        return Err("starting a network changes the host's interfaces and firewall; run it as root".into());
    }
    let mut n = load(name)?;
    if !interface_exists(&n.bridge) || !table_exists(&n) {
        if n.owns_bridge && interface_exists(&n.bridge) {
            let _ = run("ip", &["link", "del", &n.bridge]);
        }
        let _ = run("nft", &["delete", "table", "ip", &table(&n.name)]);
        let mut undo = Undo::default();
        if let Err(e) = realize(&n, &mut undo) {
            undo.run();
            return Err(e);
        }
    }
    if n.dhcp && !n.dhcp_pid.is_some_and(process_is_dhcp_server) {
        n.dhcp_pid = Some(dhcp_command(&n)?);
        save(&n)?;
    }
    Ok(n)
}

fn table_exists(n: &Network) -> bool {
    n.mode == Mode::Bridge || run("nft", &["list", "table", "ip", &table(&n.name)]).is_ok()
}

/// Takes the network off the host and forgets it.
pub fn delete(name: &str) -> Result<(), String> {
    if !is_root() {
        return Err("deleting a network changes the host's interfaces and firewall; run it as root".into());
    }
    let n = load(name)?;
    let attached = ports(&n);
    if !attached.is_empty() {
        return Err(format!("network {name} still has VMs attached ({}); stop them first", attached.join(", ")));
    }
    if let Some(pid) = n.dhcp_pid {
        kill(pid);
        // It checks for SIGTERM between packets, at least twice a second.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while process_is_dhcp_server(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let _ = run("nft", &["delete", "table", "ip", &table(name)]);
    if n.owns_bridge {
        if let (Mode::Bridge, Some(uplink)) = (n.mode, &n.uplink) {
            let _ = run("ip", &["link", "set", uplink, "nomaster"]);
        }
        let _ = run("ip", &["link", "del", &n.bridge]);
    } else if let Some(subnet) = n.subnet {
        let _ = run("ip", &["addr", "del", &format!("{}/{}", subnet.gateway(), subnet.prefix), "dev", &n.bridge]);
    }
    let _ = std::fs::remove_file(leases_path(name));
    std::fs::remove_file(definition_path(name)).map_err(|e| format!("the definition cannot be removed ({e})"))
}

/// Whether the network's bridge is on the host and its DHCP server (if any) runs.
pub fn health(n: &Network) -> Vec<String> {
    let mut problems = Vec::new();
    if !interface_exists(&n.bridge) {
        problems.push(format!("its bridge {} is missing", n.bridge));
    }
    if n.dhcp && !n.dhcp_pid.is_some_and(process_is_dhcp_server) {
        problems.push("its DHCP server is not running".into());
    }
    problems
}

/// Creates a TAP for a VM on `network`'s bridge: `name` is the TAP's, made by the caller.
/// With `isolated`, the port cannot talk to other isolated ports (bridge port isolation).
pub fn attach(network: &Network, tap: &str, isolated: bool) -> Result<(), String> {
    if let Some(problem) = health(network).first() {
        let name = &network.name;
        return Err(format!("network {name} is not usable: {problem}; run `ferrovisor network start {name}`"));
    }
    let _ = run("sysctl", &["-qw", &format!("net.ipv6.conf.{tap}.disable_ipv6=1")]);
    run("ip", &["link", "set", tap, "master", &network.bridge])?;
    if isolated {
        run("bridge", &["link", "set", "dev", tap, "isolated", "on"])?;
    }
    run("ip", &["link", "set", tap, "up"])
}

/// What the DHCP server of `network` hands out.
pub fn dhcp_pool(network: &Network) -> Option<crate::dhcp::Pool> {
    let subnet = network.subnet?;
    Some(crate::dhcp::Pool {
        gateway: subnet.gateway(),
        prefix: subnet.prefix,
        first: Ipv4Addr::from(u32::from(subnet.gateway()) + 1),
        last: subnet.last_host(),
    })
}

/// Serves DHCP on the network's bridge until `stop` says so. Leases persist in the state
/// directory, so a MAC keeps its address across restarts.
pub fn serve_dhcp(network: &Network, stop: &dyn Fn() -> bool) -> Result<(), String> {
    let pool = dhcp_pool(network).ok_or("the network has no subnet to serve")?;
    let socket =
        crate::dhcp_socket::bind(&network.bridge).map_err(|e| format!("the DHCP port cannot be bound ({e})"))?;
    let path = leases_path(&network.name);
    let mut leases = crate::dhcp::Leases::from_json(&std::fs::read_to_string(&path).unwrap_or_default());
    // From here on the server reads packets from the guests' segment.
    sandbox::apply(sandbox::ThreadKind::Dhcp).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    while !stop() {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(format!("the DHCP socket failed ({e})")),
        };
        let Some(msg) = crate::dhcp::parse(&buf[..n]) else { continue };
        // The bridge learned the sender's MAC on its port as the request came in: a MAC it has
        // not seen on any port is a forgery, and nothing can tie it to a port.
        let Some(port) = bridge_port_of(&network.bridge, &msg.mac) else {
            devices::guest_fault!(
                "DHCP on {}: a request for {}, a MAC seen on no port of the bridge, was dropped",
                network.name,
                crate::dhcp::mac_text(&msg.mac)
            );
            continue;
        };
        let before = leases.get(&msg.mac).cloned();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(reply) = crate::dhcp::answer(&pool, &mut leases, &msg, port, now) {
            if let Err(e) = socket.send_to(&reply, (Ipv4Addr::BROADCAST, 68)) {
                tracing::warn!("a DHCP reply to {} was lost ({e})", crate::dhcp::mac_text(&msg.mac));
            } else {
                tracing::info!(
                    "DHCP {} for {}",
                    match reply.get(242) {
                        Some(5) => "ACK",
                        Some(2) => "OFFER",
                        _ => "answer",
                    },
                    crate::dhcp::mac_text(&msg.mac)
                );
            }
        }
        // Written when a lease was made or moved; a renewal alone waits for the next change.
        if leases.get(&msg.mac).map(|l| (l.ip, l.port)) != before.map(|l| (l.ip, l.port)) {
            let _ = std::fs::write(&path, leases.to_json());
        }
    }
    Ok(())
}

/// The bridge port (not the bridge itself) on which the bridge learned `mac`, from its
/// forwarding database (/sys/class/net/BRIDGE/brforward: 16-byte `struct __fdb_entry`s).
fn bridge_port_of(bridge: &str, mac: &[u8; 6]) -> Option<u32> {
    let table = std::fs::read(Path::new("/sys/class/net").join(bridge).join("brforward")).ok()?;
    table.chunks_exact(16).find_map(|entry| {
        let is_local = entry[7] != 0;
        (entry[..6] == mac[..] && !is_local).then(|| u32::from(entry[12]) << 8 | u32::from(entry[6]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_overlap() {
        let s: Subnet = "10.5.0.9/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.5.0.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 5, 0, 1));
        assert_eq!(s.last_host(), Ipv4Addr::new(10, 5, 0, 254));
        assert!(s.overlaps("10.5.0.128/25".parse().unwrap()));
        assert!(s.overlaps("10.0.0.0/8".parse().unwrap()));
        assert!(!s.overlaps("10.6.0.0/24".parse().unwrap()));
        assert!("10.5.0.0/31".parse::<Subnet>().unwrap_err().contains("prefix 8 to 30"));
        assert!("10.5.0.0".parse::<Subnet>().is_err());
        let taken = ["10.210.0.0/24".parse().unwrap(), "10.210.1.0/24".parse().unwrap()];
        assert_eq!(pick_subnet(&taken).unwrap().to_string(), "10.210.2.0/24");
    }
}
