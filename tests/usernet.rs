//! User-mode networking without root: a probe guest, run as `nobody`, pings the router,
//! sends a datagram to a UDP echo server on the host's 127.0.0.1 and opens a TCP connection
//! to a listener there (through 10.0.2.2, the host's loopback); then a host client reaches the
//! guest's TCP server through a hostfwd port and gets its bytes echoed.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{Running, probe_elf, probe_result};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Lets `nobody` open /dev/kvm for the test (an ACL entry), and puts the ACL back after.
struct KvmForNobody(String);

impl KvmForNobody {
    fn grant() -> KvmForNobody {
        let saved = Command::new("getfacl").args(["--omit-header", "--absolute-names", "/dev/kvm"]).output();
        let saved = String::from_utf8_lossy(&saved.expect("getfacl runs (apt-get install acl)").stdout).into_owned();
        common::sh("setfacl", &["-m", "u:nobody:rw", "/dev/kvm"]);
        KvmForNobody(saved)
    }
}

impl Drop for KvmForNobody {
    fn drop(&mut self) {
        let mut child = Command::new("setfacl")
            .args(["--set-file=-", "/dev/kvm"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(self.0.as_bytes());
        let _ = child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn user_network_reaches_the_hosts_loopback_and_forwards_a_port_without_root() {
    let _kvm = KvmForNobody::grant();
    // The host side: a UDP echo server and a TCP listener on one port of 127.0.0.1.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let udp = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let udp_server = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let (n, peer) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(&buf[..n], peer).unwrap();
        buf[..n].to_vec()
    });
    let tcp_server = std::thread::spawn(move || {
        let (mut conn, _) = tcp.accept().unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut line = [0u8; 17];
        conn.read_exact(&mut line).unwrap();
        line.to_vec()
    });
    let forwarded = free_port();
    let cmdline = format!(
        "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.0.2.15 \
         probe.virtio-net.gw=10.0.2.2 probe.virtio-net.port={port} probe.virtio-net.listen=8080 \
         probe.virtio-net.serve=15000000000"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", env!("CARGO_BIN_EXE_ferrovisor")])
        .args(["run", "--kernel", probe_elf(), "--memory", "64", "--cmdline", &cmdline])
        .args(["--net", &format!("user,hostfwd=tcp:127.0.0.1:{forwarded}-:8080")]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE virtio-net listening port=8080", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    assert_eq!(udp_server.join().unwrap(), b"ferrovisor-probe\n", "the datagram reached the host");
    assert_eq!(tcp_server.join().unwrap(), b"ferrovisor-probe\n", "the connection carried the guest's line");

    let mut client = TcpStream::connect(("127.0.0.1", forwarded)).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.write_all(b"hello, guest\n").unwrap();
    let mut echo = [0u8; 13];
    client.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello, guest\n", "the guest echoed through the forwarded port");
    drop(client);

    let out = vm.finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.contains("gw_mac=52:55:0a:00:02:02"), "{line}");
    assert!(line.contains("icmp=reply udp=reply tcp=open served=13"), "{line}");
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
}

/// CPU time of the VMM's thread named `name`, in clock ticks.
fn thread_cpu_ticks(pid: u32, name: &str) -> u64 {
    let threads = common::thread_cpu_ticks(pid);
    threads.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} thread in {threads:?}")).1
}

/// The host ends its side of a forwarded connection while the guest keeps its own open: the
/// user network must not spin on the host socket's end-of-file.
#[test]
fn a_half_closed_relayed_connection_costs_no_cpu() {
    let forwarded = free_port();
    let cmdline = "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.0.2.15 \
         probe.virtio-net.gw=10.0.2.2 probe.virtio-net.checks=icmp probe.virtio-net.listen=8080 \
         probe.virtio-net.serve=60000000000 probe.virtio-net.halfclose=on";
    let mut cmd = common::ferrovisor();
    cmd.args(["run", "--kernel", probe_elf(), "--memory", "64", "--cmdline", cmdline])
        .args(["--net", &format!("user,hostfwd=tcp:127.0.0.1:{forwarded}-:8080")]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE virtio-net listening port=8080", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    let mut client = TcpStream::connect(("127.0.0.1", forwarded)).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.write_all(b"hello, guest\n").unwrap();
    let mut echo = [0u8; 13];
    client.read_exact(&mut echo).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = vm.child.id();
    let before = thread_cpu_ticks(pid, "usernet");
    std::thread::sleep(Duration::from_secs(2));
    let spent = thread_cpu_ticks(pid, "usernet") - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(spent * 10 < hz * 2, "the user network used {spent} ticks ({hz}/s) of CPU in 2 s of idleness");
    drop(client);
}
