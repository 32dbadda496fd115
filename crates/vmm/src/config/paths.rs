//! One way to refuse a bad path: every file, directory and socket a device names is checked
//! before the VM starts, with a sentence that names the option, the path and the fix. The
//! command line, configuration files and API bodies share these checks, each naming the option
//! in its own words (`--vsock uds=`, `vsock uds_path`).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::{ConsoleConfig, NetAttachment, PassthroughBackend, SerialConfig, VmConfig};

/// A file the VMM creates or writes to (serial and console output): its directory must exist,
/// and it must not be a directory.
pub fn output_file(path: &Path, what: &str) -> Result<(), String> {
    sandbox::files::not_empty(path, bare(what)).map_err(|e| format!("{e}."))?;
    directory_exists(path, what)?;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            Err(format!("{what}{} is a directory; give the path of a file to write to.", path.display()))
        }
        _ => Ok(()),
    }
}

/// A Unix socket the VMM creates (vsock's host side): its directory must exist, and the path
/// must be free or a stale socket.
pub fn socket_to_create(path: &Path, what: &str) -> Result<(), String> {
    sandbox::files::check_socket_path(path, bare(what))?;
    directory_exists(path, what)
}

/// A Unix socket another process serves (a switch, a vfio-user server): it must be there.
pub fn socket_to_connect(path: &Path, what: &str, fix: &str) -> Result<(), String> {
    sandbox::files::not_empty(path, bare(what)).map_err(|e| format!("{e}."))?;
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => Err(format!("{what}{} is not a Unix socket; {fix}.", path.display())),
        Err(e) => Err(format!("{what}{} cannot be reached ({e}); {fix}.", path.display())),
    }
}

/// A directory that must exist (a VFIO device's sysfs directory).
pub fn existing_directory(path: &Path, what: &str, fix: &str) -> Result<(), String> {
    sandbox::files::not_empty(path, bare(what)).map_err(|e| format!("{e}."))?;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("{what}{} is not a directory; {fix}.", path.display())),
        Err(e) => Err(format!("{what}{} cannot be read ({e}); {fix}.", path.display())),
    }
}

/// A file the guest sees as memory (virtio-pmem): a regular file whose size is a non-zero
/// multiple of 2 MiB, opened for writing unless read-only.
pub fn pmem_file(path: &Path, readonly: bool, what: &str) -> Result<(), String> {
    sandbox::files::not_empty(path, bare(what)).map_err(|e| format!("{e}."))?;
    let shown = path.display();
    let file = std::fs::OpenOptions::new().read(true).write(!readonly).open(path).map_err(|e| {
        let mode = if readonly { "" } else { " for writing (or make it readonly)" };
        format!("{what}{shown} cannot be opened{mode} ({e}); give an existing file whose size is a multiple of 2 MiB.")
    })?;
    let meta = file.metadata().map_err(|e| format!("{what}{shown} cannot be examined ({e})."))?;
    if !meta.is_file() {
        return Err(format!("{what}{shown} is not a regular file; give a file whose size is a multiple of 2 MiB."));
    }
    let len = meta.len();
    if len == 0 || !len.is_multiple_of(virtio::pmem::ALIGNMENT) {
        return Err(format!(
            "{what}{shown} is {len} bytes; its size must be a non-zero multiple of 2 MiB (truncate -s)."
        ));
    }
    Ok(())
}

/// The option without what joins it to its path (`--vsock uds=` -> `--vsock uds`), for
/// sentences that put the path elsewhere.
fn bare(what: &str) -> &str {
    what.trim_end_matches(['=', ':', ' '])
}

fn directory_exists(path: &Path, what: &str) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        _ => Err(format!(
            "{what}{}: the directory {} does not exist; create it or give a path in an existing directory.",
            path.display(),
            dir.display()
        )),
    }
}

impl VmConfig {
    /// Every path the devices name, in the command line's words.
    pub(super) fn check_paths(&self) -> Result<(), String> {
        match &self.serial {
            SerialConfig::File(path) => output_file(path, "--serial file:")?,
            SerialConfig::Path(path) => output_file(path, "serial serial_out_path ")?,
            SerialConfig::Stdio | SerialConfig::None => {}
        }
        if let Some(ConsoleConfig::File(path)) = &self.console {
            output_file(path, "--console file:")?;
        }
        for p in &self.pmem {
            pmem_file(&p.path, p.readonly, "--pmem path=")?;
        }
        if let Some(v) = &self.vsock {
            socket_to_create(&v.uds, "--vsock uds=")?;
        }
        for nic in &self.nets {
            if let NetAttachment::Switch { path, .. } = &nic.attachment {
                let fix = format!("start `ferrovisor switch {}` first", path.display());
                socket_to_connect(path, "--net switch=", &fix)?;
            }
        }
        for d in &self.passthrough {
            match &d.backend {
                PassthroughBackend::Vfio(path) => existing_directory(
                    path,
                    "--device vfio=",
                    "give a device's directory under /sys/bus/pci/devices, bound to vfio-pci",
                )?,
                PassthroughBackend::VfioUser(path) => socket_to_connect(
                    path,
                    "--device vfio-user=",
                    "start the device's vfio-user server first (such as `ferrovisor device-server PATH`)",
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_path_is_checked_and_named() {
        let dir = std::env::temp_dir().join(format!("fv-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing_dir = Path::new("/nonexistent/dir/x");
        let e = output_file(missing_dir, "--serial file:").unwrap_err();
        assert!(
            e.starts_with("--serial file:/nonexistent/dir/x: the directory /nonexistent/dir does not exist"),
            "{e}"
        );
        assert!(output_file(&dir.join("out"), "--serial file:").is_ok());
        assert!(output_file(&dir, "--console file:").unwrap_err().contains("is a directory"));
        assert!(output_file(Path::new("/dev/null"), "--serial file:").is_ok(), "a device may take the output");

        let e = socket_to_create(Path::new("/nonexistent/dir/v.sock"), "--vsock uds=").unwrap_err();
        assert!(e.contains("the directory /nonexistent/dir does not exist"), "{e}");
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(socket_to_create(&file, "--vsock uds=").unwrap_err().contains("not a socket"));

        let e = socket_to_connect(Path::new("/nonexistent.sock"), "--device vfio-user=", "start it").unwrap_err();
        assert_eq!(
            e,
            "--device vfio-user=/nonexistent.sock cannot be reached (No such file or directory (os error 2)); start it."
        );
        assert!(socket_to_connect(&file, "--net switch=", "start it").unwrap_err().contains("is not a Unix socket"));
        assert!(existing_directory(&file, "--device vfio=", "fix").unwrap_err().contains("is not a directory"));

        assert!(pmem_file(Path::new("/nonexistent"), true, "--pmem path=").unwrap_err().contains("cannot be opened"));
        let e = pmem_file(Path::new(""), true, "pmem p1 path_on_host ").unwrap_err();
        assert_eq!(e, "pmem p1 path_on_host is empty; give a path.");
        assert!(pmem_file(&file, false, "--pmem path=").unwrap_err().contains("is 1 bytes"));
        let two_mib = dir.join("pmem");
        std::fs::File::create(&two_mib).unwrap().set_len(2 << 20).unwrap();
        assert!(pmem_file(&two_mib, false, "--pmem path=").is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
