//! Live migration between two Ferrovisor processes on this host: the probe's `dirty` test keeps
//! writing memory while its VM moves, and checks every page on the destination. Also what must
//! not lose the VM: a destination that goes away, a cancel, and a hostile stream.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Running, api_call, api_vmm, probe_command, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(60);

fn status(socket: &Path) -> serde_json::Value {
    serde_json::from_str(&api_call(socket, "GET", "/ferrovisor/migration", "", 200)).unwrap()
}

/// Waits until the migration of the VMM at `socket` is in `phase`; its status.
fn wait_phase(socket: &Path, phase: &str) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = status(socket);
        if s["phase"] == phase {
            return s;
        }
        assert!(Instant::now() < deadline, "never {phase}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A probe writing 32 MiB over and over for `secs` seconds, with an API socket. It is told the
/// TSC's rate: measuring it polls the CMOS clock from ring 3, where every access is a fault that
/// this host delivers to the probe's emulated ring 0, and moving the VM in the middle of one
/// lost that delivery's stack frame here in about 1 of 30 tries (KVM's dirty log and the host's
/// page tables both miss the write; snapshots, which copy all memory, do not).
fn dirtying_source(dir: &Path, name: &str, secs: u32) -> (Running, std::path::PathBuf) {
    let socket = dir.join(name);
    let khz = common::host_tsc_khz();
    let mut cmd =
        probe_command(1, &format!("probe.test=dirty probe.dirty.mib=32 probe.dirty.secs={secs} probe.tsc.khz={khz}"));
    cmd.arg("--api-sock").arg(&socket);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE start", TIMEOUT), "{}", vm.stderr());
    (vm, socket)
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The probe moves over a Unix socket (switching over as soon as the rest fits the default
/// 300 ms) and, while it writes 32 MiB over and over, over TCP (with a 10 ms target it cannot
/// meet, so after three rounds) and over four TCP connections at once:
/// every page checks out on the destination, the source exits 0 once the destination runs the
/// VM, and both report the move. The first goes through `ferrovisor ctl SOCKET migrate URL`.
#[test]
fn a_dirtying_probe_moves_and_every_page_arrives_over_unix_and_tcp() {
    let dir = scratch_dir("migration-moves");
    let port = free_tcp_port();
    let unix = format!("unix:{}", dir.join("m.sock").display());
    let tcp = format!("tcp:127.0.0.1:{port}");
    let parallel = format!("tcp:127.0.0.1:{}", free_tcp_port());
    // The first moves as the probe starts writing, the others after seconds of it.
    for (i, (url, options, rounds, after)) in [
        (unix, "", None, Duration::from_millis(300)),
        (tcp, r#", "downtime_ms": 10, "max_rounds": 3"#, Some(3), Duration::from_millis(2500)),
        (parallel, r#", "connections": 4"#, None, Duration::from_millis(2500)),
    ]
    .into_iter()
    .enumerate()
    {
        // The second destination waits through `ferrovisor run --incoming URL`.
        let (mut destination, to) = if i != 1 {
            let (destination, to) = api_vmm(&dir, &format!("dst{i}.sock"), &[]);
            api_call(&to, "PUT", "/ferrovisor/migration/receive", &format!(r#"{{"receiver_url": "{url}"}}"#), 204);
            (destination, to)
        } else {
            let to = dir.join(format!("dst{i}.sock"));
            let mut cmd = common::ferrovisor();
            cmd.args(["run", "--incoming", &url, "--api-sock"]).arg(&to);
            let destination = Running::start(cmd);
            common::wait_for_socket(&to);
            (destination, to)
        };
        assert_eq!(status(&to)["phase"], "listening");
        let (source, from) = dirtying_source(&dir, &format!("src{i}.sock"), 5);
        std::thread::sleep(after);
        if i == 0 {
            // `ferrovisor ctl SOCKET migrate URL` follows the move until the source exits.
            let ctl = common::run(&["ctl", from.to_str().unwrap(), "migrate", &url], TIMEOUT);
            assert!(ctl.status.success(), "{}", ctl.describe());
            assert!(ctl.stdout.contains("once the VM runs on the destination"), "{}", ctl.describe());
        } else {
            let send = format!(r#"{{"destination_url": "{url}"{options}}}"#);
            api_call(&from, "PUT", "/ferrovisor/migration/send", &send, 204);
        }
        let out = source.finish(TIMEOUT);
        assert!(out.status.success(), "{}", out.describe());
        assert!(out.stderr.contains(&format!("the VM moved to {url} and runs there")), "{}", out.describe());
        if let Some(rounds) = rounds {
            assert!(out.stderr.contains(&format!("the VM runs there; {rounds} rounds")), "{}", out.describe());
        }
        let s = wait_phase(&to, "completed");
        assert!(destination.wait_for_output("PROBE dirty ok", TIMEOUT), "{}\n{}", destination.stdout(), out.stdout);
        let line = destination.stdout().lines().find(|l| l.starts_with("PROBE dirty ok")).unwrap().to_string();
        eprintln!("{url}: {line}; destination {s}");
        let out = destination.finish(TIMEOUT);
        assert!(out.status.success(), "{}", out.describe());
        assert!(out.stderr.contains("migration: the VM runs here"), "{}", out.describe());
        if options.contains("connections") {
            assert!(out.stderr.contains("pages arrive over 4 connections"), "{}", out.describe());
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A destination that reads the whole VM, state and end included, and then goes without a
/// word: the source cannot know whether the VM runs there, so it keeps its copy paused rather
/// than risk two running copies. One that refuses the VM after reading it all has the source
/// run it on.
#[test]
fn a_source_that_never_hears_back_after_the_whole_vm_keeps_it_paused() {
    for refuse in [false, true] {
        let dir = scratch_dir(if refuse { "migration-refused" } else { "migration-silent" });
        let receiver = dir.join("m.sock");
        let listener = UnixListener::bind(&receiver).unwrap();
        let destination = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // Frames: a kind byte, three zeroes, a little-endian length, the payload; 5 ends.
            loop {
                let mut header = [0u8; 8];
                s.read_exact(&mut header).unwrap();
                let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
                std::io::copy(&mut (&mut s).take(len as u64), &mut std::io::sink()).unwrap();
                if header[0] == 5 {
                    break;
                }
            }
            if refuse {
                let why = b"no room here";
                s.write_all(&[7, 0, 0, 0]).unwrap();
                s.write_all(&(why.len() as u32).to_le_bytes()).unwrap();
                s.write_all(why).unwrap();
            }
        });
        let (source, from) = dirtying_source(&dir, "src.sock", 30);
        let send = format!(r#"{{"destination_url": "unix:{}"}}"#, receiver.display());
        api_call(&from, "PUT", "/ferrovisor/migration/send", &send, 204);
        destination.join().unwrap();
        let s = wait_phase(&from, "failed");
        let info: serde_json::Value = serde_json::from_str(&api_call(&from, "GET", "/", "", 200)).unwrap();
        let expected = if refuse { "Running" } else { "Paused" };
        assert_eq!(info["state"], expected, "{s}\n{}", source.stderr());
        if !refuse {
            assert!(source.stderr().contains("rather than risk running twice"), "{}", source.stderr());
            assert!(s["error"].as_str().unwrap().contains("never said the VM runs there"), "{s}");
        }
        api_call(&from, "PUT", "/ferrovisor/stop", "", 204);
        let _ = source.finish(TIMEOUT);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A VMM upgrade in place: this build hands a running, dirtying probe with shared memory and a
/// TAP to another process of this build over a Unix socket (`ctl migrate --local`): guest
/// memory's file and the TAP's queue go over the socket, no page is copied, every page checks
/// out on the destination, which takes the TAP over, and the source exits 0.
#[test]
fn a_local_migration_hands_memory_and_the_tap_to_the_next_vmm() {
    let dir = scratch_dir("migration-local");
    let tap = common::TestTap::new("fvlm");
    let url = format!("unix:{}", dir.join("local.sock").display());
    let to = dir.join("dst.sock");
    let mut cmd = common::ferrovisor();
    cmd.args(["run", "--incoming", &url, "--api-sock"]).arg(&to);
    let mut destination = Running::start(cmd);
    common::wait_for_socket(&to);
    let from = dir.join("src.sock");
    let khz = common::host_tsc_khz();
    let tests = format!("probe.test=dirty probe.dirty.mib=32 probe.dirty.secs=4 probe.tsc.khz={khz}");
    let mut cmd = common::probe_command_with_memory(1, &tests, "size=128,shared=on");
    cmd.args(["--net", &format!("tap={},mac=02:00:00:00:0a:01", tap.name)]).arg("--api-sock").arg(&from);
    let far_side = common::PacketSocket::bind(&tap.name);
    let mut source = Running::start(cmd);
    assert!(source.wait_for_output("PROBE start", TIMEOUT), "{}", source.stderr());
    std::thread::sleep(Duration::from_millis(1500));
    let ctl = common::run(&["ctl", from.to_str().unwrap(), "migrate", &url, "--local"], TIMEOUT);
    assert!(ctl.status.success(), "{}", ctl.describe());
    let out = source.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("the VM runs there; 0 rounds, 0 MiB sent"), "no page is copied: {}", out.describe());
    // The destination announces the guest on the TAP it took over: RARP from the guest's MAC.
    far_side.set_timeout(Duration::from_secs(5));
    let rarp = far_side.recv_ethertype(0x8035).expect("a RARP announcement on the TAP");
    assert_eq!(&rarp[6..12], &[2, 0, 0, 0, 0x0a, 1], "from the guest's MAC");
    assert_eq!(&rarp[20..22], &[0, 3], "a reverse request");
    let s = wait_phase(&to, "completed");
    assert!(destination.wait_for_output("PROBE dirty ok", TIMEOUT), "{}\n{}", destination.stdout(), out.stdout);
    let line = destination.stdout().lines().find(|l| l.starts_with("PROBE dirty ok")).unwrap().to_string();
    eprintln!("local: {line}; destination {s}");
    let out = destination.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains(&format!("TAP {}: 1 queue(s) handed over", tap.name)), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// A local migration needs shared memory and a Unix socket: both refusals name the fix.
#[test]
fn a_local_migration_of_private_memory_or_over_tcp_is_refused() {
    let dir = scratch_dir("migration-local-refused");
    let (source, from) = dirtying_source(&dir, "src.sock", 2);
    let private = format!(r#"{{"destination_url": "unix:{}", "local": true}}"#, dir.join("x.sock").display());
    let answer = common::http(&from, "PUT", "/ferrovisor/migration/send", &private);
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(answer.1.contains("--memory shared=on"), "{}", answer.1);
    let tcp = r#"{"destination_url": "tcp:127.0.0.1:1", "local": true}"#;
    let answer = common::http(&from, "PUT", "/ferrovisor/migration/send", tcp);
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(answer.1.contains("local needs a unix: destination_url"), "{}", answer.1);
    let out = source.finish(TIMEOUT);
    assert!(out.stdout.contains("PROBE dirty ok"), "the VM ran on: {}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// PEM files made with openssl: a CA, and a certificate it signs for `name` (an IP address
/// SAN of 127.0.0.1, for `usage` serverAuth or clientAuth). Returns (cert, key).
fn certificate(dir: &Path, ca: &str, name: &str, usage: &str) -> (String, String) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    if !dir.join(format!("{ca}.pem")).exists() {
        let (key, pem, subject) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN={ca}"));
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subject]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
        openssl(&args);
    }
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")).unwrap();
    let (key, csr, pem, subject) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={name}"));
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
    openssl(&args);
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &pem,
        "-days",
        "2",
        "-extfile",
        ext.to_str().unwrap(),
    ]);
    (dir.join(pem).display().to_string(), dir.join(key).display().to_string())
}

/// Over `tls:`, both sides check the other's certificate against their CA: a source whose
/// certificate another CA signed is refused (the send is a 400 naming the handshake, the VM
/// runs on, and the destination waits on), and one the CA signed moves the dirtying probe,
/// every page intact.
#[test]
fn tls_moves_the_vm_between_trusted_peers_and_refuses_a_stranger() {
    let dir = scratch_dir("migration-tls");
    let (dst_cert, dst_key) = certificate(&dir, "ca", "dst", "serverAuth");
    let (src_cert, src_key) = certificate(&dir, "ca", "src", "clientAuth");
    let (evil_cert, evil_key) = certificate(&dir, "evil-ca", "evil", "clientAuth");
    let (ca, evil_ca) = (dir.join("ca.pem").display().to_string(), dir.join("evil-ca.pem").display().to_string());
    let url = format!("tls:127.0.0.1:{}", free_tcp_port());
    let (mut destination, to) = api_vmm(&dir, "dst.sock", &[]);
    let receive = serde_json::json!({"receiver_url": url, "tls_cert": dst_cert, "tls_key": dst_key, "tls_ca": ca});
    api_call(&to, "PUT", "/ferrovisor/migration/receive", &receive.to_string(), 204);
    let (source, from) = dirtying_source(&dir, "src.sock", 4);
    let stranger =
        serde_json::json!({"destination_url": url, "tls_cert": evil_cert, "tls_key": evil_key, "tls_ca": evil_ca});
    let answer = common::http(&from, "PUT", "/ferrovisor/migration/send", &stranger.to_string());
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(answer.1.contains("TLS handshake failed"), "{}", answer.1);
    assert_eq!(status(&to)["phase"], "listening", "the destination waits on");
    let trusted = serde_json::json!({"destination_url": url, "tls_cert": src_cert, "tls_key": src_key, "tls_ca": ca});
    api_call(&from, "PUT", "/ferrovisor/migration/send", &trusted.to_string(), 204);
    let out = source.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains(&format!("the VM moved to {url} and runs there")), "{}", out.describe());
    wait_phase(&to, "completed");
    assert!(destination.wait_for_output("PROBE dirty ok", TIMEOUT), "{}\n{}", destination.stdout(), out.stdout);
    let out = destination.finish(TIMEOUT);
    assert!(out.stderr.contains("a source was refused"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// A probe writing as fast as it can, with a downtime target it can never meet: round after
/// round dirties more than half of what it sent, so auto-converge holds the vCPUs back in
/// growing steps; the move still completes after `max_rounds` with every page intact.
#[test]
fn auto_converge_holds_a_fast_writer_back_and_the_move_completes() {
    let dir = scratch_dir("migration-converge");
    let url = format!("unix:{}", dir.join("m.sock").display());
    let (mut destination, to) = api_vmm(&dir, "dst.sock", &[]);
    api_call(&to, "PUT", "/ferrovisor/migration/receive", &format!(r#"{{"receiver_url": "{url}"}}"#), 204);
    let (mut source, from) = dirtying_source(&dir, "src.sock", 6);
    std::thread::sleep(Duration::from_millis(1500));
    let send = format!(r#"{{"destination_url": "{url}", "downtime_ms": 1, "max_rounds": 12}}"#);
    api_call(&from, "PUT", "/ferrovisor/migration/send", &send, 204);
    // The status until the source exits (a poll that finds it gone ends the loop).
    let mut held = 0;
    while matches!(source.child.try_wait(), Ok(None)) {
        let poll = std::panic::catch_unwind(|| common::http(&from, "GET", "/ferrovisor/migration", "").1);
        let Ok(body) = poll else { break };
        let s: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        held = held.max(s["throttle_percent"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = source.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("vCPUs held back 20%"), "{}", out.describe());
    assert!(out.stderr.contains("the VM runs there;"), "{}", out.describe());
    eprintln!("throttle seen in the status: {held}%");
    assert!(held >= 20, "the status showed the throttle");
    wait_phase(&to, "completed");
    assert!(destination.wait_for_output("PROBE dirty ok", TIMEOUT), "{}\n{}", destination.stdout(), out.stdout);
    let _ = destination.finish(TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}

/// Post-copy over a Unix socket and over TCP: after one pass the VM switches over without the
/// pages the probe dirtied since, runs on the destination, and fetches each on first touch
/// while the source pushes the rest; every page checks out and both sides say post-copy ended.
#[test]
fn post_copy_runs_the_vm_on_the_destination_before_its_last_pages_arrive() {
    let dir = scratch_dir("migration-postcopy");
    let (dst_cert, dst_key) = certificate(&dir, "ca", "dst", "serverAuth");
    let (src_cert, src_key) = certificate(&dir, "ca", "src", "clientAuth");
    let ca = dir.join("ca.pem");
    let tls = |cert: &str, key: &str| serde_json::json!({"tls_cert": cert, "tls_key": key, "tls_ca": ca});
    let plain = serde_json::json!({});
    // A body: `fields` and, over TLS, the certificate's.
    let body = |mut fields: serde_json::Value, tls: &serde_json::Value| {
        fields.as_object_mut().unwrap().extend(tls.as_object().unwrap().clone());
        fields.to_string()
    };
    for (i, (url, receive_tls, send_tls)) in [
        (format!("unix:{}", dir.join("m.sock").display()), plain.clone(), plain.clone()),
        (format!("tcp:127.0.0.1:{}", free_tcp_port()), plain.clone(), plain.clone()),
        // Requests and pages share one TLS stream.
        (format!("tls:127.0.0.1:{}", free_tcp_port()), tls(&dst_cert, &dst_key), tls(&src_cert, &src_key)),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut destination, to) = api_vmm(&dir, &format!("dst{i}.sock"), &[]);
        let receive = body(serde_json::json!({"receiver_url": url}), &receive_tls);
        api_call(&to, "PUT", "/ferrovisor/migration/receive", &receive, 204);
        let (source, from) = dirtying_source(&dir, &format!("src{i}.sock"), 8);
        std::thread::sleep(Duration::from_millis(1500));
        let send = serde_json::json!({"destination_url": url, "postcopy": true, "max_rounds": 1});
        api_call(&from, "PUT", "/ferrovisor/migration/send", &body(send, &send_tls), 204);
        let out = source.finish(TIMEOUT);
        assert!(out.status.success(), "{}", out.describe());
        assert!(out.stderr.contains("post-copy of"), "{}", out.describe());
        assert!(destination.wait_for_output("PROBE dirty ok", TIMEOUT), "{}\n{}", destination.stdout(), out.stdout);
        let line = destination.stdout().lines().find(|l| l.starts_with("PROBE dirty ok")).unwrap().to_string();
        eprintln!("{url}: {line}");
        let out = destination.finish(TIMEOUT);
        assert!(out.stderr.contains("post-copy done, every page is here"), "{}", out.describe());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A probe on the switch echoes UDP while the test, on another port of the switch, sends a
/// datagram every 5 ms; the VM moves to a VMM that plugs in a new port. The destination's
/// announcement teaches the switch the new port: the echoes resume, and the longest silence
/// is the outage the peer saw.
#[test]
fn a_udp_flow_through_the_switch_resumes_after_the_move() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = scratch_dir("migration-switch");
    let switch = dir.join("switch.sock");
    let mut switch_process = Running::start({
        let mut cmd = common::ferrovisor();
        cmd.arg("switch").arg(&switch);
        cmd
    });
    let deadline = Instant::now() + TIMEOUT;
    while !switch.exists() {
        assert!(Instant::now() < deadline, "the switch never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("unix:{}", dir.join("m.sock").display());
    let (destination, to) = api_vmm(&dir, "dst.sock", &[]);
    api_call(&to, "PUT", "/ferrovisor/migration/receive", &format!(r#"{{"receiver_url": "{url}"}}"#), 204);
    let from = dir.join("src.sock");
    let tests = format!(
        "probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=10.9.0.2 probe.virtio-net.gw=10.9.0.2 \
         probe.virtio-net.checks= probe.virtio-net.listen=7777 probe.virtio-net.serve=40000000000 probe.tsc.khz={}",
        common::host_tsc_khz()
    );
    let mut cmd = probe_command(1, &tests);
    cmd.args(["--net", &format!("switch={},mac=02:00:00:00:0a:02", switch.display())]).arg("--api-sock").arg(&from);
    let mut source = Running::start(cmd);
    assert!(source.wait_for_output("PROBE start", TIMEOUT), "{}", source.stderr());
    let peer = net::switch::SwitchPort::connect(&switch, 0).unwrap();
    let listener = peer.try_clone().unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let echoes = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut times = Vec::new();
            let mut buf = [0u8; 2048];
            common::set_receive_timeout(&listener, Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = listener.recv_frame(&mut buf)
                    && n > 42
                    && buf[12..14] == [0x08, 0x00]
                    && buf[23] == 17
                {
                    times.push(Instant::now());
                }
            }
            times
        }
    });
    let send_until = |until: Instant| {
        let mut port = 40000u16;
        while Instant::now() < until {
            let _ = peer.send_frame(&common::udp_frame_to_probe([2, 0, 0, 0, 0x0a, 2], port, 1));
            port = port.wrapping_add(1).max(40000);
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    send_until(Instant::now() + Duration::from_secs(2));
    let moved_at = Instant::now();
    api_call(&from, "PUT", "/ferrovisor/migration/send", &format!(r#"{{"destination_url": "{url}"}}"#), 204);
    send_until(Instant::now() + Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let times = echoes.join().unwrap();
    let out = source.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    wait_phase(&to, "completed");
    let before = times.iter().filter(|t| **t < moved_at).count();
    let after: Vec<&Instant> = times.iter().filter(|t| **t > moved_at + Duration::from_secs(2)).collect();
    let outage = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    eprintln!("echoes: {before} before the move, {} in the last 2 s; longest silence {outage:?}", after.len());
    assert!(before >= 50, "the flow ran before the move ({before} echoes)");
    assert!(after.len() >= 50, "the flow resumed after the move ({} echoes in its last 2 s)", after.len());
    api_call(&to, "PUT", "/ferrovisor/stop", "", 204);
    let out = destination.finish(TIMEOUT);
    assert!(out.stderr.contains("announced the guest's 1 interface(s)"), "{}", out.describe());
    switch_process.child.kill().ok();
    let _ = std::fs::remove_dir_all(dir);
}

/// A VM on a TAP moves within one host by copy when the destination names another TAP for its
/// interface (`network_overrides`, as `/snapshot/load` takes them): the guest is announced on
/// the new TAP; an override naming an interface the VM lacks fails the build with a sentence.
#[test]
fn the_destination_puts_an_arriving_interface_on_another_tap() {
    let dir = scratch_dir("migration-override");
    let (old_tap, new_tap) = (common::TestTap::new("fvmo"), common::TestTap::new("fvmn"));
    let far_side = common::PacketSocket::bind(&new_tap.name);
    far_side.set_timeout(Duration::from_secs(10));
    for (i, iface) in ["nope", "net0"].into_iter().enumerate() {
        let url = format!("unix:{}", dir.join(format!("m{i}.sock")).display());
        let (mut destination, to) = api_vmm(&dir, &format!("dst{i}.sock"), &[]);
        let receive = serde_json::json!({"receiver_url": url,
            "network_overrides": [{"iface_id": iface, "host_dev_name": new_tap.name}]});
        api_call(&to, "PUT", "/ferrovisor/migration/receive", &receive.to_string(), 204);
        let from = dir.join(format!("src{i}.sock"));
        let tests =
            format!("probe.test=dirty probe.dirty.mib=8 probe.dirty.secs=3 probe.tsc.khz={}", common::host_tsc_khz());
        let mut cmd = probe_command(1, &tests);
        cmd.args(["--net", &format!("tap={},mac=02:00:00:00:0a:03", old_tap.name)]).arg("--api-sock").arg(&from);
        let mut source = Running::start(cmd);
        assert!(source.wait_for_output("PROBE start", TIMEOUT), "{}", source.stderr());
        api_call(&from, "PUT", "/ferrovisor/migration/send", &format!(r#"{{"destination_url": "{url}"}}"#), 204);
        if iface == "nope" {
            let s = wait_phase(&from, "failed");
            assert!(
                s["error"].as_str().unwrap().contains("network_overrides: the migrated VM has no interface nope"),
                "{s}"
            );
            assert!(source.finish(TIMEOUT).stdout.contains("PROBE dirty ok"), "the VM ran on");
            let _ = destination.child.kill();
            continue;
        }
        assert!(source.finish(TIMEOUT).status.success());
        assert!(destination.wait_for_output("PROBE dirty ok", TIMEOUT), "{}", destination.stdout());
        let rarp = far_side.recv_ethertype(0x8035).expect("the guest announced on the new TAP");
        assert_eq!(&rarp[6..12], &[2, 0, 0, 0, 0x0a, 3]);
        let _ = destination.finish(TIMEOUT);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A destination that reads a little and hangs up, and one that never reads until the
/// migration is cancelled: each time the source says why, the VM runs on there, and the probe
/// finishes with every page intact. A destination that is not there is a 400.
#[test]
fn a_destination_that_goes_away_or_a_cancel_leaves_the_vm_running_on_the_source() {
    let dir = scratch_dir("migration-fails");
    let (source, from) = dirtying_source(&dir, "src.sock", 6);
    let nobody = format!(r#"{{"destination_url": "unix:{}"}}"#, dir.join("nobody.sock").display());
    let answer = common::http(&from, "PUT", "/ferrovisor/migration/send", &nobody);
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(answer.1.contains("cannot be reached"), "{}", answer.1);

    let fake = dir.join("fake.sock");
    let listener = UnixListener::bind(&fake).unwrap();
    let send = format!(r#"{{"destination_url": "unix:{}"}}"#, fake.display());
    api_call(&from, "PUT", "/ferrovisor/migration/send", &send, 204);
    let (mut connection, _) = listener.accept().unwrap();
    let mut some = vec![0u8; 1 << 16];
    connection.read_exact(&mut some).unwrap();
    drop(connection);
    let s = wait_phase(&from, "failed");
    assert!(s["error"].as_str().unwrap().contains("the destination stopped taking the stream"), "{s}");

    api_call(&from, "PUT", "/ferrovisor/migration/send", &send, 204);
    let (silent, _) = listener.accept().unwrap();
    let again = common::http(&from, "PUT", "/ferrovisor/migration/send", &send);
    assert_eq!(again.0, 400, "one migration at a time: {}", again.1);
    api_call(&from, "PUT", "/ferrovisor/migration/cancel", "", 204);
    wait_phase(&from, "cancelled");
    drop(silent);
    // Three tries, none of which moved the VM, in the metrics.
    let metrics: serde_json::Value =
        serde_json::from_str(&api_call(&from, "GET", "/ferrovisor/metrics", "", 200)).unwrap();
    let m = &metrics["migration"];
    assert_eq!(
        (m["started"].as_u64(), m["completed"].as_u64(), m["failed"].as_u64()),
        (Some(3), Some(0), Some(3)),
        "{m}"
    );
    assert!(m["bytes_sent"].as_u64().unwrap() > 0, "{m}");

    let out = source.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stdout.contains("PROBE dirty ok"), "the VM ran on: {}", out.describe());
    assert!(out.stderr.contains("failed: the destination stopped taking the stream"), "{}", out.describe());
    assert!(out.stderr.contains("failed: the migration was cancelled; the VM runs on here"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, 0, 0, 0];
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Sends `stream` to a destination waiting at `url_path` and returns its answer frame.
fn answer_to(url_path: &Path, stream: &[u8]) -> (u8, String) {
    let mut connection = UnixStream::connect(url_path).unwrap();
    connection.set_read_timeout(Some(TIMEOUT)).unwrap();
    let _ = connection.write_all(stream);
    let mut header = [0u8; 8];
    connection.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(header[4..].try_into().unwrap()) as usize];
    connection.read_exact(&mut body).unwrap();
    (header[0], String::from_utf8(body).unwrap())
}

/// A destination treats the stream as untrusted: another stream version, a configuration it
/// would refuse, pages outside the memory that configuration lays out, and an oversized frame
/// are each answered with a sentence, and the VMM waits for the next migration.
#[test]
fn the_destination_refuses_a_hostile_stream_and_says_why() {
    let dir = scratch_dir("migration-hostile");
    // A real configuration, as a snapshot's state file holds it.
    let (probe, socket) = {
        let socket = dir.join("probe.sock");
        let mut cmd = probe_command(1, "probe.idle=on");
        cmd.arg("--api-sock").arg(&socket);
        let mut vm = Running::start(cmd);
        assert!(vm.wait_for_output("PROBE start", TIMEOUT), "{}", vm.stderr());
        (vm, socket)
    };
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    api_call(&socket, "PUT", "/snapshot/create", &create.to_string(), 204);
    api_call(&socket, "PUT", "/ferrovisor/stop", "", 204);
    probe.finish(TIMEOUT);
    let text = std::fs::read_to_string(&state).unwrap();
    let body: serde_json::Value = serde_json::from_str(text.split_once('\n').unwrap().1).unwrap();
    let config = body["config"].clone();

    // The version this build's stream carries (vmm::migration::stream::VERSION).
    const STREAM_VERSION: u32 = 2;
    let hello = |version: u32| {
        let h = serde_json::json!({"magic": "ferrovisor-migration", "version": version, "vmm_version": "9.9.9"});
        frame(1, h.to_string().as_bytes())
    };
    let mut outside = hello(STREAM_VERSION);
    outside.extend(frame(2, config.to_string().as_bytes()));
    let mut pages = (64u64 << 30).to_le_bytes().to_vec();
    pages.extend_from_slice(&[0xaa; 4096]);
    outside.extend(frame(3, &pages));
    let mut too_big = hello(STREAM_VERSION);
    too_big.extend_from_slice(&[2, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f]);
    let mut refused = config.clone();
    refused["memory_mib"] = serde_json::json!(0);
    let mut bad_config = hello(STREAM_VERSION);
    bad_config.extend(frame(2, refused.to_string().as_bytes()));

    let (destination, to) = api_vmm(&dir, "dst.sock", &[]);
    let receiver = dir.join("m.sock");
    let receive = format!(r#"{{"receiver_url": "unix:{}"}}"#, receiver.display());
    let unknown_version = format!("reads only version {STREAM_VERSION}");
    for (stream, why) in [
        (hello(99), unknown_version.as_str()),
        (bad_config, "the migrated configuration is refused"),
        (outside, "outside the VM's memory"),
        (too_big, "larger than the"),
    ] {
        api_call(&to, "PUT", "/ferrovisor/migration/receive", &receive, 204);
        let (kind, sentence) = answer_to(&receiver, &stream);
        assert_eq!(kind, 7, "an Error frame: {sentence}");
        assert!(sentence.contains(why), "{why}: {sentence}");
        let s = wait_phase(&to, "failed");
        assert!(s["error"].as_str().unwrap().contains(why), "{s}");
    }
    let bad = common::http(&to, "PUT", "/ferrovisor/migration/receive", r#"{"receiver_url": "http://x"}"#);
    assert!(bad.0 == 400 && bad.1.contains("receiver_url"), "{}", bad.1);
    api_call(&to, "GET", "/", "", 200);
    api_call(&to, "PUT", "/ferrovisor/stop", "", 204);
    let out = destination.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());

    // `run --incoming`: a bad URL is a usage error, and a stream that brings no VM ends it.
    let out = common::run(&["run", "--incoming", "http://x"], TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("--incoming \"http://x\" is not unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"),
        "{}",
        out.describe()
    );
    let mut cmd = common::ferrovisor();
    cmd.args(["run", "--incoming", &format!("unix:{}", receiver.display())]);
    let waiting = Running::start(cmd);
    let deadline = Instant::now() + TIMEOUT;
    // The path appears once it listens (a connection to check would be taken for the source).
    while !receiver.exists() {
        assert!(Instant::now() < deadline, "run --incoming never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (kind, sentence) = answer_to(&receiver, &hello(99));
    assert_eq!(kind, 7, "{sentence}");
    let out = waiting.finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("no VM arrived: the source sends stream version 99"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}
