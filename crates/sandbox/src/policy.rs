//! Which filters the process runs under, loaded once at start-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

use crate::ThreadKind;

/// Where the filters come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Ferrovisor's own filters (the default).
    Default,
    /// No filters (`--no-seccomp`).
    Disabled,
    /// A file of seccompiler's JSON or Firecracker's compiled BPF (`--seccomp-filter`); kinds
    /// it does not name keep the default filter.
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{reason}; give a filter file (--seccomp-filter {path}).")]
    Read { path: String, reason: String },
    #[error("--seccomp-filter {path} is not seccompiler JSON: {reason}; fix the file or give compiled BPF.")]
    Json { path: String, reason: String },
    #[error(
        "--seccomp-filter {path} is not Firecracker's compiled BPF format: {reason}; compile it with seccompiler-bin."
    )]
    Bpf { path: String, reason: String },
    #[error(
        "--seccomp-filter {path} has a filter for '{name}', which is no Ferrovisor thread; name one of {}.",
        kind_names()
    )]
    UnknownThread { path: String, name: String },
    #[error("the seccomp filter for {kind} threads cannot be built ({reason}).")]
    Build { kind: &'static str, reason: String },
    #[error("the seccomp filter for {kind} threads cannot be installed ({reason}).")]
    Install { kind: &'static str, reason: String },
    #[error("the thread launcher cannot start ({0}).")]
    Launcher(std::io::Error),
    #[error("the seccomp policy was already chosen.")]
    AlreadyChosen,
}

fn kind_names() -> String {
    ThreadKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// A filter file this size is already absurd (Firecracker's holds about 40 KiB).
const MAX_FILE: u64 = 4 << 20;
/// The kernel's limit on a filter's instructions.
const BPF_MAXINSNS: u64 = 4096;

/// The filters, or None when disabled; set once.
static FILTERS: OnceLock<Option<Filters>> = OnceLock::new();

/// The filters of a policy: those a file gave, and the default of every other kind, compiled
/// when a thread of that kind first needs it (compiling all 17 took 0.2 ms of the launch).
struct Filters {
    given: BTreeMap<ThreadKind, BpfProgram>,
    defaults: [OnceLock<Result<BpfProgram, String>>; ThreadKind::ALL.len()],
}

impl Filters {
    fn new(given: BTreeMap<ThreadKind, BpfProgram>) -> Filters {
        Filters { given, defaults: [const { OnceLock::new() }; ThreadKind::ALL.len()] }
    }

    fn get(&self, kind: ThreadKind) -> Result<&BpfProgram, Error> {
        if let Some(program) = self.given.get(&kind) {
            return Ok(program);
        }
        let index = ThreadKind::ALL.iter().position(|k| *k == kind).expect("every kind is in ALL");
        self.defaults[index]
            .get_or_init(|| crate::default_filter(kind).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|reason| Error::Build { kind: kind.name(), reason: reason.clone() })
    }
}

/// Chooses the filters, once; true when they are on.
pub(crate) fn choose(policy: &Policy) -> Result<bool, Error> {
    let filters = match policy {
        Policy::Disabled => None,
        Policy::Default => Some(Filters::new(BTreeMap::new())),
        Policy::File(path) => Some(Filters::new(read_file(path)?)),
    };
    let on = filters.is_some();
    FILTERS.set(filters).map_err(|_| Error::AlreadyChosen)?;
    if on {
        single_malloc_arena();
    }
    Ok(on)
}

/// glibc's malloc opens files behind a filtered thread's back when it runs more than one
/// arena: /sys/devices/system/cpu/online when a thread first needs an arena beyond the first
/// few, /proc/sys/vm/overcommit_memory when a thread's arena shrinks. Both would be forbidden
/// openat calls. With one arena (the main one, grown with brk) neither happens; each thread's
/// tcache keeps small allocations off the arena's lock.
fn single_malloc_arena() {
    // SAFETY: mallopt only sets a malloc tunable; no thread allocates concurrently this early.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Installs `kind`'s filter on the calling thread (nothing when filters are off). An empty
/// filter from a file means no filter for that kind, as in Firecracker.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(Some(filters)) = FILTERS.get() else { return Ok(()) };
    crate::sigsys::set_thread(kind);
    match filters.get(kind)? {
        program if !program.is_empty() => {
            seccompiler::apply_filter(program).map_err(|e| Error::Install { kind: kind.name(), reason: e.to_string() })
        }
        _ => Ok(()),
    }
}

/// [`apply`] for a thread that must not run unfiltered: on failure the VMM stops.
pub(crate) fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        tracing::error!("{e} The VMM stops rather than run the thread unfiltered.");
        // SAFETY: _exit ends the process at once; nothing here needs unwinding.
        unsafe { libc::_exit(1) };
    }
}

fn read_file(path: &Path) -> Result<BTreeMap<ThreadKind, BpfProgram>, Error> {
    let shown = path.display().to_string();
    let bytes = crate::files::read_regular(path, "--seccomp-filter", MAX_FILE)
        .map_err(|reason| Error::Read { path: shown.clone(), reason })?;
    parse(&bytes, &shown)
}

/// Parses a filter file: seccompiler's JSON when it starts with `{`, else Firecracker's
/// compiled format.
pub fn parse(bytes: &[u8], path: &str) -> Result<BTreeMap<ThreadKind, BpfProgram>, Error> {
    let named = if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| Error::Json { path: path.into(), reason: e.to_string() })?;
        seccompiler::compile_from_json(bytes, arch)
            .map_err(|e| Error::Json { path: path.into(), reason: e.to_string() })?
            .into_iter()
            .collect::<Vec<_>>()
    } else {
        parse_bpf(bytes).map_err(|reason| Error::Bpf { path: path.into(), reason })?
    };
    named
        .into_iter()
        .map(|(name, program)| match ThreadKind::ALL.iter().find(|k| k.name() == name) {
            Some(kind) => Ok((*kind, program)),
            None => Err(Error::UnknownThread { path: path.into(), name }),
        })
        .collect()
}

/// Firecracker's compiled filters: a bincode map from thread name to BPF instructions
/// (little-endian, u64 lengths; each instruction u16 code, u8 jt, u8 jf, u32 k).
fn parse_bpf(bytes: &[u8]) -> Result<Vec<(String, BpfProgram)>, String> {
    let mut input = Reader { bytes, at: 0 };
    let count = input.u64()?;
    if count > ThreadKind::ALL.len() as u64 {
        return Err(format!("it names {count} threads, more than the {} Ferrovisor has", ThreadKind::ALL.len()));
    }
    let mut filters = Vec::new();
    for _ in 0..count {
        let name_len = input.u64()?;
        if name_len > 64 {
            return Err(format!("a thread name is {name_len} bytes long"));
        }
        let name = std::str::from_utf8(input.take(name_len as usize)?)
            .map_err(|_| "a thread name is not UTF-8".to_string())?
            .to_string();
        let len = input.u64()?;
        if len > BPF_MAXINSNS {
            return Err(format!(
                "the filter for '{name}' has {len} instructions, more than the kernel's {BPF_MAXINSNS}"
            ));
        }
        let mut program = Vec::with_capacity(len as usize);
        for _ in 0..len {
            let raw = input.take(8)?;
            let code = u16::from_le_bytes([raw[0], raw[1]]);
            let k = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            program.push(sock_filter { code, jt: raw[2], jf: raw[3], k });
        }
        filters.push((name, program));
    }
    if input.at != bytes.len() {
        return Err(format!("{} bytes follow the last filter", bytes.len() - input.at));
    }
    Ok(filters)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or("the file ends early")?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let raw = self.take(8)?;
        Ok(u64::from_le_bytes(raw.try_into().map_err(|_| "the file ends early")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bincode(filters: &[(&str, &[sock_filter])]) -> Vec<u8> {
        let mut out = (filters.len() as u64).to_le_bytes().to_vec();
        for (name, program) in filters {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((program.len() as u64).to_le_bytes());
            for i in *program {
                out.extend(i.code.to_le_bytes());
                out.extend([i.jt, i.jf]);
                out.extend(i.k.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn compiled_filters_load() {
        let program = crate::default_filter(ThreadKind::Vcpu).unwrap();
        let parsed = parse(&bincode(&[("vcpu", &program), ("api", &[])]), "f").unwrap();
        assert_eq!(parsed[&ThreadKind::Vcpu], program);
        assert!(parsed[&ThreadKind::Api].is_empty());
    }

    #[test]
    fn json_filters_load() {
        let json = r#"{"virtio-blk": {"default_action": "allow", "filter_action": "trap",
                       "filter": [{"syscall": "pread64"}]}}"#;
        let parsed = parse(json.as_bytes(), "f").unwrap();
        assert!(!parsed[&ThreadKind::Block].is_empty());
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let program = crate::default_filter(ThreadKind::Vcpu).unwrap();
        let good = bincode(&[("vcpu", &program)]);
        for cut in [0, 7, 8, 20, good.len() - 1] {
            assert!(matches!(parse(&good[..cut], "f"), Err(Error::Bpf { .. })), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(parse(&long, "f").is_err());
        assert!(matches!(parse(&bincode(&[("vmmm", &[])]), "f"), Err(Error::UnknownThread { .. })));
        let huge = [u64::MAX.to_le_bytes(), 0u64.to_le_bytes()].concat();
        assert!(parse(&huge, "f").is_err());
        let e = parse(b"{\"vcpu\": 1}", "f").unwrap_err();
        assert!(e.to_string().contains("not seccompiler JSON"), "{e}");
    }
}
