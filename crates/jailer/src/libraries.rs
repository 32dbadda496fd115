//! A dynamically linked VMM needs its ELF interpreter and shared libraries inside the jail:
//! they are found from the binary's own headers (PT_INTERP, DT_NEEDED) and copied in at the
//! same paths. A static binary (Firecracker's musl build) needs nothing.

use std::path::{Path, PathBuf};

/// Where the dynamic loader looks on Debian and most distributions.
const LIBRARY_DIRS: [&str; 6] =
    ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// What an ELF file asks the loader for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn c_string(b: &[u8], at: usize) -> Option<String> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// Reads the interpreter and needed libraries of a 64-bit little-endian ELF (None for another
/// kind of file).
pub fn dynamic(elf: &[u8]) -> Option<Dynamic> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(elf, 0x36)?), usize::from(u16_at(elf, 0x38)?));
    let headers: Vec<(u32, u64, u64, u64)> = (0..phnum)
        .map(|i| {
            let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
            Some((u32_at(elf, h)?, u64_at(elf, h + 8)?, u64_at(elf, h + 16)?, u64_at(elf, h + 32)?))
        })
        .collect::<Option<_>>()?;
    let to_offset = |vaddr: u64| {
        headers.iter().find_map(|&(kind, offset, start, size)| {
            (kind == 1 && vaddr >= start && vaddr - start < size)
                .then(|| usize::try_from(vaddr - start + offset).ok())?
        })
    };
    let mut found = Dynamic::default();
    for &(kind, offset, _, _) in &headers {
        let offset = usize::try_from(offset).ok()?;
        match kind {
            3 => found.interpreter = c_string(elf, offset),
            2 => {
                let (mut needed, mut strtab) = (Vec::new(), None);
                for entry in (offset..elf.len()).step_by(16) {
                    match (u64_at(elf, entry)?, u64_at(elf, entry + 8)?) {
                        (0, _) => break,
                        (1, name) => needed.push(name),
                        (5, table) => strtab = to_offset(table),
                        _ => {}
                    }
                }
                let strtab = strtab?;
                found.needed = needed
                    .into_iter()
                    .filter_map(|n| c_string(elf, strtab.checked_add(usize::try_from(n).ok()?)?))
                    .collect();
            }
            _ => {}
        }
    }
    Some(found)
}

fn find_library(name: &str) -> Option<PathBuf> {
    LIBRARY_DIRS.iter().map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

/// Every file the loader needs to run `binary`: the interpreter and the libraries, followed
/// through the libraries' own needs. Empty for a static binary.
pub fn closure(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut pending = vec![binary.to_path_buf()];
    while let Some(file) = pending.pop() {
        let bytes = std::fs::read(&file).map_err(|e| format!("{} cannot be read ({e})", file.display()))?;
        let Some(found) = dynamic(&bytes) else { continue };
        let mut wanted: Vec<PathBuf> = found.interpreter.into_iter().map(PathBuf::from).collect();
        for name in found.needed {
            wanted.push(find_library(&name).ok_or(format!("{} needs {name}, which is not installed", file.display()))?);
        }
        for path in wanted {
            if !files.contains(&path) {
                files.push(path.clone());
                pending.push(path);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binarys_loader_and_libc_are_found() {
        // The host's shell is dynamically linked; Ferrovisor's own binaries are static.
        let files = closure(Path::new("/bin/sh")).unwrap();
        assert!(files.iter().any(|f| f.to_string_lossy().contains("ld-linux")), "{files:?}");
        assert!(files.iter().any(|f| f.file_name().is_some_and(|n| n == "libc.so.6")), "{files:?}");
    }

    #[test]
    fn a_static_binary_needs_nothing() {
        let me = std::env::current_exe().unwrap();
        assert_eq!(dynamic(&std::fs::read(&me).unwrap()), Some(Dynamic::default()), "this test binary is static");
        assert!(closure(&me).unwrap().is_empty());
    }

    #[test]
    fn other_files_and_truncated_elves_are_not_dynamic() {
        assert_eq!(dynamic(b"#!/bin/sh\n"), None);
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        for cut in [0, 7, 64, 200] {
            let _ = dynamic(&me[..cut.min(me.len())]);
        }
    }
}
