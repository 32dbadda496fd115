//! Helpers shared by the integration tests: running the `ferrovisor` binary with a deadline,
//! packaging hand-made guest code as an ELF kernel, and finding the built Linux guest.

#![allow(dead_code)]

/// The probe's data patterns, shared with the host side of the tests.
#[path = "../../guest/probe/src/pattern.rs"]
pub mod pattern;
pub mod raw_socket;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The command line the project's Linux guest needs on hosts that emulate its ring 0
/// (nested kvm_pvm): harmless on VT-x/AMD-V hardware. The root flags keep ext4 from starting
/// its lazy-init thread after a read-write mount: that thread soon exits, and a thread's exit
/// runs `fwait`, which those hosts' emulator cannot run (measured here: 2 of 10 boots stopped
/// on it before init without the flags, none of 12 with them).
pub const LINUX_HOST_CMDLINE: &str = "noxsave clearcpuid=popcnt,cx16,rdrand,rdseed,serialize,smap \
    mitigations=off tsc=reliable 8250.nr_uarts=1 rootflags=noinit_itable,no_prefetch_block_bitmaps";

pub fn ferrovisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
}

/// A fresh directory for one test's files.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrovisor-test-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `code` as an ELF64 executable with one segment loaded and entered at 1 MiB, the shape of a
/// vmlinux without a PVH note: Ferrovisor enters it in 64-bit mode.
pub fn elf_kernel(code: &[u8]) -> Vec<u8> {
    const LOAD_ADDR: u64 = 0x10_0000;
    const CODE_OFFSET: usize = 0x1000;
    let mut image = vec![0u8; CODE_OFFSET];
    let header: &mut [u8] = &mut image;
    header[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    header[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    header[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    header[20..24].copy_from_slice(&1u32.to_le_bytes());
    header[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    header[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    header[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    header[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    header[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut header[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&(CODE_OFFSET as u64).to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    image.extend_from_slice(code);
    image
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What a finished VMM process left behind.
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!("status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }
}

/// A running VMM whose output is collected as it arrives.
pub struct Running {
    pub child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

impl Running {
    pub fn start(mut cmd: Command) -> Running {
        cmd.stdin(Stdio::null());
        Self::start_with_stdin(cmd)
    }

    /// Starts `cmd` with the standard input it was given.
    pub fn start_with_stdin(mut cmd: Command) -> Running {
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the ferrovisor binary starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Running { child, stdout, stderr, readers, started: Instant::now() }
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stdout contains `needle`; false if the deadline passes or the VMM exits first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stdout().contains(needle) {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                thread::sleep(Duration::from_millis(50));
                return self.stdout().contains(needle);
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends `signal` to the VMM, then waits for it as [`Running::finish`] does.
    pub fn finish_after_signal(self, signal: i32, timeout: Duration) -> Outcome {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.finish(timeout)
    }

    /// Waits up to `timeout` from now for the VMM to exit; kills it and panics with its output
    /// if it does not.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                panic!(
                    "ferrovisor did not exit within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.stdout(),
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout = self.stdout();
        let stderr = self.stderr.lock().unwrap().clone();
        Outcome { status, stdout, stderr, elapsed }
    }
}

/// A test that ends without finishing its VMM (a failed assertion, an idle guest it no longer
/// needs) must not leave the VMM behind.
impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ferrovisor` with `args` to completion.
pub fn run(args: &[&str], timeout: Duration) -> Outcome {
    let mut cmd = ferrovisor();
    cmd.args(args);
    Running::start(cmd).finish(timeout)
}

/// A command that boots `code` as a tiny ELF guest written into `dir`.
pub fn tiny_guest_command(dir: &Path, code: &[u8], cpus: u32, memory_mib: u64) -> Command {
    let kernel = write_file(dir, "tiny.elf", &elf_kernel(code));
    let mut cmd = ferrovisor();
    cmd.args(["run", "--kernel", kernel.to_str().unwrap(), "--cmdline", ""]).args([
        "--cpus",
        &cpus.to_string(),
        "--memory",
        &memory_mib.to_string(),
    ]);
    cmd
}

/// Boots `code` as a tiny ELF guest to completion.
pub fn run_tiny_guest(test: &str, code: &[u8], cpus: u32, memory_mib: u64) -> Outcome {
    let dir = scratch_dir(test);
    let outcome = Running::start(tiny_guest_command(&dir, code, cpus, memory_mib)).finish(Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(dir);
    outcome
}

/// This host's KVM runs guest ring 0 in an instruction emulator (nested kvm_pvm).
pub fn host_emulates_ring0() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The Linux guest built by guest/build.sh.
pub fn linux_guest() -> PathBuf {
    let dir = std::env::var_os("FERROVISOR_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME is set");
        PathBuf::from(home).join(".cache/ferrovisor/guest/current")
    });
    assert!(
        dir.join("vmlinux").exists(),
        "no Linux guest in {}: run guest/build.sh (or set FERROVISOR_GUEST_DIR)",
        dir.display()
    );
    dir
}

/// The probe guest built by build.rs.
pub fn probe_elf() -> &'static str {
    env!("FERROVISOR_PROBE_ELF")
}

/// A command that boots the probe under Ferrovisor with 128 MiB.
pub fn probe_command(cpus: u32, cmdline: &str) -> Command {
    probe_command_with_memory(cpus, cmdline, "128")
}

/// A command that boots the probe under Ferrovisor with `--memory memory`.
pub fn probe_command_with_memory(cpus: u32, cmdline: &str, memory: &str) -> Command {
    let mut cmd = ferrovisor();
    cmd.args(["run", "--kernel", probe_elf(), "--memory", memory, "--cmdline", cmdline])
        .args(["--cpus", &cpus.to_string()]);
    cmd
}

/// The probe's protocol lines (`PROBE ...`) in `output`.
pub fn probe_lines(output: &str) -> Vec<&str> {
    output.lines().map(|l| l.trim_end_matches('\r')).filter(|l| l.starts_with("PROBE ")).collect()
}

/// The line reporting `test`, e.g. `PROBE smp ok cpus=2 ...`.
pub fn probe_result<'a>(output: &'a str, test: &str) -> Option<&'a str> {
    let prefix = format!("PROBE {test} ");
    probe_lines(output).into_iter().find(|l| {
        l.strip_prefix(&prefix)
            .is_some_and(|rest| rest.starts_with("ok") || rest.starts_with("FAIL") || rest.starts_with("skip"))
    })
}

/// QEMU on `machine` with KVM, 128 MiB, no default devices and its serial port on stdout.
fn qemu_command(machine: &str, cpus: u32) -> Command {
    let version = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (scripts/test.sh does)"
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    // -arch-capabilities: QEMU 7.2 aborts when nested kvm_pvm refuses that MSR; harmless elsewhere.
    cmd.args(["-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128"])
        .args(["-smp", &cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]);
    cmd
}

/// A command that boots the probe under QEMU's microvm machine, with modern virtio-mmio and
/// `extra` QEMU arguments (devices). QEMU does not announce its virtio-mmio slots to a PVH
/// kernel, so all 24 (512 bytes each from 0xfeb00000, filled from the top) are named here.
pub fn qemu_probe_command<S: AsRef<std::ffi::OsStr>>(cpus: u32, tests: &str, extra: &[S]) -> Command {
    let slots: Vec<String> =
        (0..24u64).map(|n| format!("virtio_mmio.device=512@{:#x}:{}", 0xfeb0_0000 + n * 0x200, 12 + n)).collect();
    let mut cmd = qemu_command("microvm,rtc=on", cpus);
    cmd.args(["-global", "virtio-mmio.force-legacy=false"]).args(extra).args([
        "-kernel",
        probe_elf(),
        "-append",
        &format!("{tests} {}", slots.join(" ")),
    ]);
    cmd
}

/// A command that boots the probe under QEMU's PC machine, whose firmware (SeaBIOS) places the
/// PCI functions' BARs, with `extra` QEMU arguments (devices).
pub fn qemu_pc_probe_command<S: AsRef<std::ffi::OsStr>>(tests: &str, extra: &[S]) -> Command {
    let mut cmd = qemu_command("pc", 1);
    cmd.args(extra).args(["-kernel", probe_elf(), "-append", tests]);
    cmd
}

/// Runs a command that must succeed (test set-up such as `ip`), panicking with its output.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A TAP device created for one test (IPv6 off so that the host stays quiet on it, link up),
/// removed when dropped.
pub struct TestTap {
    pub name: String,
}

impl TestTap {
    pub fn new(prefix: &str) -> TestTap {
        TestTap::create(prefix, &[])
    }

    /// A TAP with several queues (IFF_MULTI_QUEUE), for multi-queue virtio-net.
    pub fn multi_queue(prefix: &str) -> TestTap {
        TestTap::create(prefix, &["multi_queue"])
    }

    fn create(prefix: &str, flags: &[&str]) -> TestTap {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        sh("ip", &[&["tuntap", "add", &name, "mode", "tap"], flags].concat());
        sh("sysctl", &["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")]);
        sh("ip", &["link", "set", &name, "up"]);
        TestTap { name }
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).output();
    }
}

/// Sets how long a receive on socket `fd` waits (SO_RCVTIMEO).
pub fn set_receive_timeout(fd: &impl std::os::fd::AsRawFd, timeout: Duration) {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as i64, tv_usec: i64::from(timeout.subsec_micros()) };
    // SAFETY: SO_RCVTIMEO takes a timeval, which `tv` is, alive for the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
}

/// A raw packet socket on one interface: the far side of a TAP.
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    pub fn bind(interface: &str) -> PacketSocket {
        let fd = raw_socket::bind(interface);
        // Room for thousands of frames: the test reads them after the burst.
        let rcvbuf: libc::c_int = 64 << 20;
        // SAFETY: SO_RCVBUFFORCE takes an int; it needs CAP_NET_ADMIN, which the TAP tests have.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const rcvbuf).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        let timeout = libc::timeval { tv_sec: 10, tv_usec: 0 };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sending from a live slice on our bound socket.
        let n = unsafe { libc::send(std::os::fd::AsRawFd::as_raw_fd(&self.fd), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    /// Sets how long a receive waits.
    pub fn set_timeout(&self, timeout: Duration) {
        set_receive_timeout(&self.fd, timeout);
    }

    /// The next frame with `ethertype`, skipping others; None after the receive timeout.
    pub fn recv_ethertype(&self, ethertype: u16) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: receiving into a live buffer of its length.
            let n =
                unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(&self.fd), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return None;
            }
            let frame = &buf[..n as usize];
            if frame.len() >= 14 && frame[12..14] == ethertype.to_be_bytes() {
                return Some(frame.to_vec());
            }
        }
    }
}

/// A network namespace for one test, deleted (with everything in it) when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        NetNs { name }
    }

    /// `program args` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A child process killed when dropped (a DHCP server, say).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A disk image of `len` bytes whose every sector holds the probe's pattern for `seed`, as its
/// blk throughput mode verifies (`probe.virtio-blk.verify=SEED`).
pub fn patterned_image(seed: u64, len: usize) -> Vec<u8> {
    let mut content = vec![0u8; len];
    for (sector, chunk) in content.chunks_exact_mut(512).enumerate() {
        pattern::fill_sector(seed, sector as u64, chunk);
    }
    content
}

/// Checks that sectors [first, first + count) of `disk` hold the probe's pattern for `seed` and
/// the rest are zero; returns the checksum the probe reports for the pattern.
pub fn check_blk_pattern(disk: &[u8], seed: u64, first: u64, count: u64) -> u64 {
    let mut expected = vec![0u8; 512];
    let mut checksum = pattern::FNV_OFFSET;
    for (sector, actual) in disk.chunks_exact(512).enumerate() {
        let sector = sector as u64;
        if (first..first + count).contains(&sector) {
            pattern::fill_sector(seed, sector, &mut expected);
            assert_eq!(actual, &expected[..], "sector {sector} holds the probe's pattern");
            checksum = pattern::fnv1a(checksum, actual);
        } else {
            assert!(actual.iter().all(|&b| b == 0), "sector {sector} is untouched");
        }
    }
    checksum
}

/// The probe's virtio-blk line for a 256 KiB read-only disk holding `content`, 16 sectors read.
pub fn assert_read_only_blk_result(out: &Outcome, content: &[u8]) {
    let blk = probe_result(&out.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", out.describe()));
    let checksum = pattern::fnv1a(pattern::FNV_OFFSET, &content[..16 * 512]);
    assert!(blk.starts_with("PROBE virtio-blk ok sectors=16 capacity=512 readonly=yes"), "{blk}");
    assert!(blk.contains(" write=refused "), "{blk}");
    assert!(blk.ends_with(&format!("checksum={checksum:#x}")), "{blk}");
}

/// The probe's virtio-rng and virtio-blk tests as both VMMs run them: the pattern for seed 7
/// on sectors 8..108 of a 1 MiB disk whose serial is probe-disk.
pub const RNG_AND_BLK_TESTS: &str =
    "probe.test=virtio-rng,virtio-blk probe.virtio-blk.start=8 probe.virtio-blk.sectors=100 probe.virtio-blk.seed=7";

/// Checks the results of RNG_AND_BLK_TESTS against the disk image the VMM served.
pub fn assert_rng_and_blk_results(out: &Outcome, image: &Path) {
    assert_eq!(probe_result(&out.stdout, "virtio-rng"), Some("PROBE virtio-rng ok bytes=128"), "{}", out.describe());
    let blk = probe_result(&out.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", out.describe()));
    let expected =
        "PROBE virtio-blk ok sectors=100 capacity=2048 readonly=no flush=yes write=ok beyond_end=ioerr id=probe-disk ";
    assert!(blk.starts_with(expected), "{blk}");
    let checksum = check_blk_pattern(&std::fs::read(image).unwrap(), 7, 8, 100);
    assert!(blk.ends_with(&format!("checksum={checksum:#x}")), "{blk} vs {checksum:#x}");
}

/// The probe's virtio-net exchange as both VMMs run it: the guest (MAC 52:54:00:12:34:56)
/// sends 4 frames of 100 and 1514 bytes and waits for 3; it says `ready` first.
pub const NET_EXCHANGE_TESTS: &str = "probe.test=virtio-net probe.virtio-net.tx=4 probe.virtio-net.size=100 probe.virtio-net.rx=3 probe.virtio-net.seed=5";
pub const NET_EXCHANGE_READY: &str = "PROBE virtio-net ready mac=52:54:00:12:34:56";
const NET_EXCHANGE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The three frames the host sends the guest.
pub fn host_frames() -> Vec<Vec<u8>> {
    [60usize, 1514, 342]
        .into_iter()
        .enumerate()
        .map(|(i, len)| {
            let mut frame = vec![0u8; len];
            pattern::fill_frame(99, i as u64, [2, 0, 0, 0, 0, 9], &mut frame);
            frame
        })
        .collect()
}

/// Checks both directions of the exchange: `received` (what left the guest) byte for byte,
/// and the guest's report of what it got from `host_frames()`.
pub fn assert_net_exchange(out: &Outcome, received: &[Vec<u8>]) {
    for (i, frame) in received.iter().enumerate() {
        let len = if i % 2 == 0 { 100 } else { 1514 };
        let mut expected = vec![0u8; len];
        pattern::fill_frame(5, i as u64, NET_EXCHANGE_MAC, &mut expected);
        assert_eq!(frame, &expected, "frame {i} arrives exactly as the guest built it");
    }
    let sent = host_frames();
    let checksum = sent.iter().fold(pattern::FNV_OFFSET, |c, f| pattern::fnv1a(c, f));
    let bytes: usize = sent.iter().map(Vec::len).sum();
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.starts_with("PROBE virtio-net ok mac=52:54:00:12:34:56 tx=4 tx_bytes=3228 "), "{line}");
    assert!(line.ends_with(&format!("rx=3 rx_bytes={bytes} rx_checksum={checksum:#x}")), "{line}");
}

/// One HTTP/1.1 request on a Unix socket, written by hand as any plain client would: returns
/// the status and the body.
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap_or_else(|e| panic!("{socket:?}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    parse_http_response(&response)
}

/// Status and body of a raw HTTP response.
pub fn parse_http_response(response: &str) -> (u16, String) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {response:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, body.to_string())
}

/// Waits until the VMM listens on `socket`.
pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the VMM never listened on {socket:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The counter values of the probe's complete `PROBE tick n=N` lines, in order. A line cut
/// short (a VM stopped or snapshotted while printing it) is not counted.
pub fn probe_ticks(output: &str) -> Vec<u64> {
    let complete = match output.rfind('\n') {
        Some(end) => &output[..=end],
        None => "",
    };
    probe_lines(complete).iter().filter_map(|l| l.strip_prefix("PROBE tick n=")?.parse().ok()).collect()
}

/// Checks that the outputs of the VMMs a counting guest ran in, one after the other (each
/// restored from the previous one's snapshot), hold one unbroken count: the line a VMM was
/// printing when its snapshot was taken ends in the next one. Returns the last tick.
pub fn assert_one_count(outputs: &[&str]) -> u64 {
    let joined: String = outputs.concat();
    let ticks = probe_ticks(&joined);
    assert!(!ticks.is_empty(), "no ticks: {joined}");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "the count restarts, repeats or skips: {ticks:?}");
    *ticks.last().unwrap()
}

/// Checks the probe counter's disk: sector n % 64 holds the pattern of the last tick n written
/// to it, for every tick up to `last` (tick last + 1 may have written before it printed).
pub fn check_counter_disk(disk: &[u8], last: u64) {
    let mut newest = [0u64; 64];
    for n in 1..=last {
        newest[(n % 64) as usize] = n;
    }
    let mut expected = vec![0u8; 512];
    let mut holds = |n: u64, sector: usize, actual: &[u8]| {
        if n == 0 {
            return actual.iter().all(|&b| b == 0);
        }
        pattern::fill_sector(n, sector as u64, &mut expected);
        actual == &expected[..]
    };
    for (sector, &n) in newest.iter().enumerate() {
        let actual = &disk[sector * 512..][..512];
        let next = last + 1;
        let ok = holds(n, sector, actual) || (next % 64 == sector as u64 && holds(next, sector, actual));
        assert!(ok, "sector {sector} should hold the pattern of tick {n} (last tick {last})");
    }
}

/// A network lab for the managed-network tests: a "host" namespace where Ferrovisor runs and
/// realizes its networks, an "outside" namespace behind a veth pair (192.0.2.1 outside,
/// 192.0.2.2 the host's uplink `vh`), and a server outside that echoes UDP on port 7777,
/// accepts TCP on 7777, and logs each peer's address. Networks' state lives in a directory
/// of the lab's; dropping the lab deletes its networks and both namespaces.
pub struct NetLab {
    pub host: NetNs,
    pub outside: NetNs,
    pub state: PathBuf,
    pub server_log: PathBuf,
    server: Option<Child>,
}

pub const LAB_SERVER: &str = r#"
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp_socket.bind(("0.0.0.0", 7777))
tcp_socket = socket.socket()
tcp_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp_socket.bind(("0.0.0.0", 7777))
tcp_socket.listen()
def udp():
    while True:
        data, peer = udp_socket.recvfrom(2048)
        log.write(f"udp {peer[0]}\n")
        udp_socket.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
open(sys.argv[1] + ".ready", "w").close()
while True:
    conn, peer = tcp_socket.accept()
    log.write(f"tcp {peer[0]}\n")
    conn.close()
"#;

impl NetLab {
    pub fn new(prefix: &str) -> NetLab {
        let host = NetNs::new(&format!("{prefix}h"));
        let outside = NetNs::new(&format!("{prefix}o"));
        // Unique on the host while the lab lives: tests of one process may each make a lab.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let lab =
            format!("{}x{}", std::process::id() % 100_000, LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let (vh, vo) = (format!("vh{lab}"), format!("vo{lab}"));
        sh("ip", &["link", "add", &vh, "type", "veth", "peer", "name", &vo]);
        sh("ip", &["link", "set", &vh, "netns", &host.name]);
        sh("ip", &["link", "set", &vo, "netns", &outside.name]);
        sh("ip", &["-n", &host.name, "link", "set", &vh, "name", "vh"]);
        sh("ip", &["-n", &outside.name, "link", "set", &vo, "name", "vo"]);
        for (ns, dev, addr) in [(&host, "vh", "192.0.2.2/24"), (&outside, "vo", "192.0.2.1/24")] {
            sh("ip", &["-n", &ns.name, "addr", "add", addr, "dev", dev]);
            sh("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
            sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        }
        // The outside is the host's way to everything, as the internet would be.
        sh("ip", &["-n", &host.name, "route", "add", "default", "via", "192.0.2.1"]);
        let state = scratch_dir(&format!("{prefix}-state"));
        let server_log = state.join("server.log");
        std::fs::write(&server_log, "").unwrap();
        let server = outside
            .command("python3")
            .args(["-c", LAB_SERVER])
            .arg(&server_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        // "The outside saw nothing" means something only once the server listens: it says so
        // with a file beside its log.
        let ready = server_log.with_extension("log.ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the lab's outside server never listened");
            thread::sleep(Duration::from_millis(10));
        }
        NetLab { host, outside, state, server_log, server: Some(server) }
    }

    /// `ferrovisor ARGS` in the host namespace, with the lab's state directory.
    pub fn ferrovisor(&self) -> Command {
        let mut cmd = self.host.command(env!("CARGO_BIN_EXE_ferrovisor"));
        cmd.env("FERROVISOR_STATE_DIR", &self.state);
        cmd
    }

    /// Runs `ferrovisor network ARGS` and returns its outcome.
    pub fn network(&self, args: &[&str]) -> std::process::Output {
        self.ferrovisor().arg("network").args(args).output().unwrap()
    }

    /// A command in the host namespace that must succeed; its stdout.
    pub fn host_sh(&self, program: &str, args: &[&str]) -> String {
        let out = self.host.command(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The peers the outside server saw, as "udp 1.2.3.4" lines.
    pub fn server_saw(&self) -> String {
        std::fs::read_to_string(&self.server_log).unwrap_or_default()
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Each network's DHCP server lives outside the namespaces' lifetime: delete them all.
        if let Ok(dir) = std::fs::read_dir(self.state.join("networks")) {
            for entry in dir.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if let Some(name) = file.strip_suffix(".json").filter(|n| !n.ends_with(".leases")) {
                    let _ = self.network(&["delete", name]);
                }
            }
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// `ferrovisor --api-sock DIR/NAME EXTRA...`, listening.
pub fn api_vmm(dir: &Path, name: &str, extra: &[&str]) -> (Running, PathBuf) {
    let socket = dir.join(name);
    let mut cmd = ferrovisor();
    cmd.arg("--api-sock").arg(&socket).args(extra);
    let vm = Running::start(cmd);
    wait_for_socket(&socket);
    (vm, socket)
}

/// One API request that must answer `status`; the body.
pub fn api_call(socket: &Path, method: &str, path: &str, body: &str, status: u16) -> String {
    let (got, answer) = http(socket, method, path, body);
    assert_eq!(got, status, "{method} {path} {body}: {answer}");
    answer
}

/// Waits until the probe printed `at_least` counter ticks; returns them.
pub fn wait_for_ticks(vm: &mut Running, at_least: usize, timeout: Duration) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let ticks = probe_ticks(&vm.stdout());
        if ticks.len() >= at_least {
            return ticks;
        }
        assert!(Instant::now() < deadline, "fewer than {at_least} ticks: {}\n{}", vm.stdout(), vm.stderr());
        thread::sleep(Duration::from_millis(20));
    }
}

/// Each thread of process `pid`: its name and the CPU time it used (utime + stime, in clock
/// ticks).
pub fn thread_cpu_ticks(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
            let fields: Vec<u64> = stat
                .rsplit_once(')')
                .map_or("", |(_, r)| r)
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            (name, fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0))
        })
        .collect()
}

/// A FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo {}", path.display());
}

/// `ferrovisor device-server` on DIR/dma.sock, killed when dropped.
pub struct DeviceServer {
    pub child: Child,
    pub socket: PathBuf,
}

impl DeviceServer {
    pub fn start(dir: &Path, extra: &[&str]) -> DeviceServer {
        let socket = dir.join("dma.sock");
        let _ = std::fs::remove_file(&socket);
        let child = ferrovisor()
            .arg("device-server")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the device server never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        DeviceServer { child, socket }
    }

    pub fn device_arg(&self) -> String {
        format!("vfio-user={}", self.socket.display())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An IPv4/UDP frame to the probe's multi-queue port from source port `port`: the TAP hashes
/// flows by addresses and ports, so that different ports spread over its queues.
pub fn udp_frame_to_probe(mac: [u8; 6], port: u16, payload_seed: u64) -> Vec<u8> {
    let mut frame = vec![0u8; 42 + 64];
    frame[0..6].copy_from_slice(&mac);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (frame.len() - 14) as u16;
    frame[14..34].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 9, 0, 1, 10, 9, 0, 2]);
    frame[16..18].copy_from_slice(&ip_len.to_be_bytes());
    frame[34..36].copy_from_slice(&port.to_be_bytes());
    frame[36..38].copy_from_slice(&7777u16.to_be_bytes());
    frame[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    let mut payload = vec![0u8; 64 + 14];
    pattern::fill_frame(payload_seed, u64::from(port), [0; 6], &mut payload);
    frame[42..].copy_from_slice(&payload[14..]);
    frame
}

/// The MAC in the probe's `PROBE virtio-net ready mac=...` line.
pub fn probe_net_mac(stdout: &str) -> [u8; 6] {
    let ready = stdout.lines().find(|l| l.starts_with("PROBE virtio-net ready mac=")).expect("the ready line");
    let mac: Vec<u8> = ready["PROBE virtio-net ready mac=".len()..][..17]
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    mac.try_into().unwrap()
}

/// Sends `count` UDP flows (source ports from `first_port`, payloads from `seed`) to the probe's
/// multi-queue mode at `mac` through `far_side`; returns the check of the probe's report: every
/// frame arrived whole, and both of the first two receive queues got some.
pub fn send_flows_to_probe(
    far_side: &PacketSocket,
    mac: [u8; 6],
    first_port: u16,
    count: u16,
    seed: u64,
) -> impl FnOnce(&Outcome) + use<> {
    let (mut sum, mut bytes) = (0u64, 0);
    for flow in 0..count {
        let frame = udp_frame_to_probe(mac, first_port + flow, seed);
        far_side.send(&frame);
        sum = sum.wrapping_add(pattern::fnv1a(pattern::FNV_OFFSET, &frame));
        bytes += frame.len();
    }
    move |out: &Outcome| {
        let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
        assert!(line.contains(&format!(" rx={count} rx_bytes={bytes} rx_sum={sum:#x} ")), "{line}");
        let per_queue: Vec<u64> =
            line.split("rx_per_queue=").nth(1).unwrap().split(',').map(|n| n.trim().parse().unwrap()).collect();
        assert!(per_queue[0] > 0 && per_queue[1] > 0, "both receive queues get flows: {line}");
    }
}

/// The host's TSC rate in kHz, near enough for a probe's timings (`probe.tsc.khz=`): from
/// /proc/cpuinfo, 2 GHz where it says nothing.
pub fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1)?.trim().parse::<f64>().ok())
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}
