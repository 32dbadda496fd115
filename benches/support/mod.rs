//! What the benchmarks share: medians, the VMM's own memory, and driving a VMM through its API.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn kib(value: &str) -> u64 {
    value.trim().trim_end_matches("kB").trim().parse().unwrap_or_else(|_| panic!("not a size in kB: {value:?}"))
}

/// The VMM's own memory: its RSS less the resident part of the guest RAM mapping (mappings of
/// 64 MiB or more), both from one read of its smaps (VmRSS read apart from them counts guest
/// pages a process that is exiting has already unmapped). Panics when the process cannot be read, so that a crashed VMM never shows
/// up as a VMM that costs nothing.
pub fn overhead_kib(pid: u32) -> u64 {
    overhead_kib_while_alive(pid).unwrap_or_else(|| panic!("the VMM (pid {pid}) cannot be read; did it crash?"))
}

/// [`overhead_kib`], or None once the process has exited (for sampling a VMM that will).
pub fn overhead_kib_while_alive(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut size, mut rss, mut guest, mut mappings) = (0u64, 0u64, 0u64, 0);
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = kib(v);
            mappings += 1;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            rss += kib(v);
            if size >= 64 * 1024 {
                guest += kib(v);
            }
        }
    }
    // An exited process (a zombie) has no mappings.
    (mappings > 0).then_some(rss - guest)
}

/// A VMM's memory from `/proc/PID/smaps`, guest RAM (mappings of 64 MiB or more) left out, in
/// KiB: what it has resident, what of that is anonymous (what each more VM costs: heap, stacks,
/// copied pages), and its proportional share (pages shared with other processes divided among
/// them), by kind of mapping.
#[derive(Clone, Debug, Default)]
pub struct Footprint {
    pub rss: u64,
    pub anonymous: u64,
    pub pss: u64,
    /// Proportional share of everything, guest RAM included.
    pub pss_with_guest: u64,
    /// (kind, resident, anonymous): the binary, shared libraries, [heap], [stack], other.
    pub kinds: Vec<(String, u64, u64)>,
}

impl Footprint {
    /// Reads `pid`'s smaps; `binary` names the VMM's own executable in it. Panics when the
    /// process cannot be read, so that a crashed VMM never shows up as one that costs nothing.
    pub fn of(pid: u32, binary: &str) -> Footprint {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .unwrap_or_else(|e| panic!("the VMM (pid {pid}) cannot be read ({e}); did it crash?"));
        let mut f = Footprint::default();
        let (mut kind, mut size) = (String::new(), 0u64);
        let add = |f: &mut Footprint, kind: &str, rss: u64, anonymous: u64| match f
            .kinds
            .iter_mut()
            .find(|(k, _, _)| k == kind)
        {
            Some(entry) => {
                entry.1 += rss;
                entry.2 += anonymous;
            }
            None => f.kinds.push((kind.to_string(), rss, anonymous)),
        };
        let mut rss = 0;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or_default();
            if first.contains('-') && !first.ends_with(':') {
                // A mapping's header: range, permissions, offset, device, inode, name.
                let name = words.nth(4).unwrap_or_default();
                kind = match name {
                    "" => "anonymous".to_string(),
                    n if n.ends_with(binary) => "binary".to_string(),
                    n if n.starts_with('[') => n.to_string(),
                    n if n.contains(".so") => "shared libraries".to_string(),
                    _ => "other".to_string(),
                };
                continue;
            }
            let mut value = || kib(words.next().unwrap_or_default());
            match first {
                "Size:" => size = value(),
                "Rss:" => rss = value(),
                "Pss:" => {
                    let pss = value();
                    f.pss_with_guest += pss;
                    if size < 64 * 1024 {
                        f.pss += pss;
                    }
                }
                "Anonymous:" => {
                    let anonymous = value();
                    if size < 64 * 1024 {
                        f.rss += rss;
                        f.anonymous += anonymous;
                        let k = kind.clone();
                        add(&mut f, &k, rss, anonymous);
                    }
                }
                _ => {}
            }
        }
        f
    }
}

/// One API request on `socket`: the status and the body.
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("the API socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// An API request that must succeed.
pub fn ok(socket: &Path, method: &str, path: &str, body: &str) {
    let (status, answer) = http(socket, method, path, body);
    assert!(status < 300, "{method} {path}: {status} {answer}");
}

/// Waits until a VMM listens on `socket`.
pub fn wait_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "no socket {socket:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A VMM serving its API on `socket` (errors only in its log), its stdout piped; returned once
/// it listens.
pub fn api_vmm(socket: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .arg("--api-sock")
        .arg(socket)
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_socket(socket);
    child
}

/// Whether QEMU is installed; says so when it is not (the benchmark then measures Ferrovisor
/// alone).
pub fn qemu_available() -> bool {
    let have = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("qemu-system-x86_64 is missing (apt-get install qemu-system-x86): measuring Ferrovisor alone");
    }
    have
}

/// Creates the TAP `name` (root only) and a scratch directory named after `bench`.
pub fn tap_and_scratch(name: &str, bench: &str) -> std::path::PathBuf {
    let ok = Command::new("ip").args(["tuntap", "add", name, "mode", "tap"]).status().is_ok_and(|s| s.success());
    assert!(ok, "cannot create TAP {name}: this benchmark runs as root");
    let dir = std::env::temp_dir().join(format!("ferrovisor-{bench}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A QMP session: greeting read, capabilities negotiated.
pub struct Qmp(BufReader<UnixStream>);

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        wait_socket(path);
        let mut q = Qmp(BufReader::new(UnixStream::connect(path).unwrap()));
        q.line();
        q.command(r#"{"execute": "qmp_capabilities"}"#);
        q
    }
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        l
    }
    /// Sends a command and returns its answer, skipping events.
    pub fn command(&mut self, json: &str) -> String {
        self.0.get_mut().write_all(json.as_bytes()).unwrap();
        loop {
            let l = self.line();
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    }
    pub fn wait_until(&mut self, json: &str, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.command(json).contains(needle) {
            assert!(Instant::now() < deadline, "QEMU never reached {needle}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// QEMU microvm booting `kernel` with `cmdline` and `mib` MiB, its serial on a piped stdout and
/// its QMP socket at `qmp` (replaced), plus `extra` arguments.
pub fn qemu_with_qmp(kernel: &Path, cmdline: &str, mib: u64, qmp: &Path, extra: &[&str]) -> Child {
    let _ = std::fs::remove_file(qmp);
    Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", &mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
        .args(["-kernel", kernel.to_str().unwrap(), "-append", cmdline])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp.display())])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 runs")
}
