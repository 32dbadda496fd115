//! Opening the files API clients and command lines name, each checked for what it must be, so
//! that a client cannot make the VMM truncate a device, append to a socket, block on a FIFO
//! with no reader, or unlink what is not its socket.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// An empty path names nothing (and would fail later with a confusing error).
pub fn not_empty(path: &Path, what: &str) -> Result<(), String> {
    match path.as_os_str().is_empty() {
        true => Err(format!("{what} is empty; give a path")),
        false => Ok(()),
    }
}

/// Opens a log or metrics output: a regular file (appended to, created if missing) or a FIFO.
/// A FIFO is opened read-write and non-blocking, so that neither the open nor a write waits
/// for a reader: lines a full FIFO cannot take are dropped.
pub fn open_output(path: &Path, what: &str) -> Result<File, String> {
    not_empty(path, what).map_err(|e| format!("{e}."))?;
    let shown = path.display();
    let existing = std::fs::metadata(path).ok();
    if let Some(meta) = &existing
        && !meta.is_file()
        && !meta.file_type().is_fifo()
    {
        return Err(format!("{what} {shown} is {}; give a regular file or a FIFO.", kind(meta)));
    }
    let is_fifo = existing.as_ref().is_some_and(|m| m.file_type().is_fifo());
    let mut options = OpenOptions::new();
    options.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY);
    if is_fifo {
        options.read(true).write(true);
    } else {
        options.append(true).create(true);
    }
    let file = options
        .open(path)
        .map_err(|e| format!("{what} {shown} cannot be opened ({e}); give a writable file or FIFO."))?;
    // The path may have been swapped between the check and the open: check what was opened.
    let meta = file.metadata().map_err(|e| format!("{what} {shown} cannot be examined ({e})."))?;
    if !meta.is_file() && !meta.file_type().is_fifo() {
        return Err(format!("{what} {shown} is {}; give a regular file or a FIFO.", kind(&meta)));
    }
    Ok(file)
}

/// Reads a whole input file (a snapshot's state, a configuration) that must be a regular file of
/// at most `max` bytes: a FIFO is neither waited on nor read, a device such as /dev/zero is not
/// read without end.
pub fn read_regular(path: &Path, what: &str, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = open_regular(path, what)?;
    let len = file.metadata().map_err(|e| format!("{what} {} cannot be examined ({e})", path.display()))?.len();
    if len > max {
        return Err(format!("{what} {} is {len} bytes, more than the {max} it may be", path.display()));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what} {} cannot be read ({e})", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(format!("{what} {} grew past the {max} bytes it may be", path.display()));
    }
    Ok(bytes)
}

/// Opens an input file for reading, refusing anything but a regular file (without blocking
/// on a FIFO to find out).
pub fn open_regular(path: &Path, what: &str) -> Result<File, String> {
    not_empty(path, what)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("{what} {} cannot be opened ({e}); give an existing file", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("{what} {} cannot be examined ({e})", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{what} {} is {}; give a regular file", path.display(), kind(&meta)));
    }
    Ok(file)
}

/// Creates or truncates a file the VMM writes whole (snapshot state, memory), refusing to
/// overwrite anything but a regular file.
pub fn create_output(path: &Path, what: &str) -> Result<File, String> {
    not_empty(path, what).map_err(|e| format!("{e}."))?;
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.is_file()
    {
        return Err(format!("{what} {shown} is {}; give a new path or a regular file to overwrite.", kind(&meta)));
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("{what} {shown} cannot be created ({e}); give a writable path."))?;
    Ok(file)
}

/// Creates a file the VMM writes whole (a snapshot's state or memory) as a new file at `path`:
/// an existing regular file there is unlinked first, never truncated. Truncating a file that
/// was just written makes ext4 flush its data at close (its replace-by-truncate heuristic),
/// which made every other snapshot ten times slower; and a restored VM may still map the old
/// memory file, whose pages must not vanish under it.
pub fn replace_output(path: &Path, what: &str) -> Result<File, String> {
    not_empty(path, what).map_err(|e| format!("{e}."))?;
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.is_file() {
            return Err(format!("{what} {shown} is {}; give a new path or a regular file to replace.", kind(&meta)));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("{what} {shown} cannot be replaced ({e}); give a writable path."))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("{what} {shown} cannot be created ({e}); give a writable path."))
}

/// Checks that `path` is free for a Unix socket: absent, or a stale socket (true).
pub fn check_socket_path(path: &Path, what: &str) -> Result<bool, String> {
    if path.as_os_str().is_empty() {
        return Err(format!("{what} is empty; give the path of a Unix socket to create."));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("{what} {} cannot be examined ({e}).", path.display())),
        Ok(meta) if meta.file_type().is_socket() => Ok(true),
        Ok(meta) => Err(format!(
            "{what} {} is {}, not a socket; give a new path (Ferrovisor removes only a stale socket there).",
            path.display(),
            kind(&meta)
        )),
    }
}

/// Removes a stale Unix socket at `path` before binding there; anything else is left alone
/// and refused.
pub fn remove_stale_socket(path: &Path, what: &str) -> Result<(), String> {
    if check_socket_path(path, what)? {
        std::fs::remove_file(path)
            .map_err(|e| format!("{what} {} is a stale socket that cannot be removed ({e}).", path.display()))?;
    }
    Ok(())
}

/// Checks that a drive image, where one exists, is a regular file or a block device (a
/// missing one is reported by whoever opens it).
pub fn check_drive(path: &Path, what: &str) -> Result<(), String> {
    not_empty(path, what).map_err(|e| format!("{e}."))?;
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    if meta.is_file() || meta.file_type().is_block_device() {
        Ok(())
    } else {
        Err(format!("{what} {} is {}; give a disk image file or a block device.", path.display(), kind(&meta)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fv-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_fifo_without_a_reader_opens_and_never_blocks() {
        let dir = scratch("fifo");
        let fifo = dir.join("log.fifo");
        mkfifo(&fifo);
        let mut file = open_output(&fifo, "log_path").unwrap();
        use std::io::Write;
        // Fill the pipe: a write then fails with WouldBlock instead of waiting.
        let line = [b'x'; 4096];
        let mut blocked = false;
        for _ in 0..1024 {
            if let Err(e) = file.write(&line) {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                blocked = true;
                break;
            }
        }
        assert!(blocked);
    }

    #[test]
    fn outputs_must_be_files_or_fifos() {
        let dir = scratch("outputs");
        let e = open_output(&dir, "log_path").unwrap_err();
        assert!(e.contains("is a directory; give a regular file or a FIFO"), "{e}");
        assert!(open_output(Path::new("/dev/null"), "metrics_path").unwrap_err().contains("character device"));
        open_output(&dir.join("new.log"), "log_path").unwrap();
        assert!(create_output(Path::new("/dev/null"), "snapshot_path").unwrap_err().contains("character device"));
        create_output(&dir.join("snap"), "snapshot_path").unwrap();
        // A replaced file is a new one: whoever still has the old one open keeps its contents.
        let old = dir.join("mem");
        std::fs::write(&old, b"old memory").unwrap();
        let still_open = File::open(&old).unwrap();
        let mut new = replace_output(&old, "mem_file_path").unwrap();
        std::io::Write::write_all(&mut new, b"new").unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"new");
        let mut kept = String::new();
        std::io::Read::read_to_string(&mut &still_open, &mut kept).unwrap();
        assert_eq!(kept, "old memory");
        assert!(replace_output(Path::new("/dev/null"), "mem_file_path").unwrap_err().contains("character device"));
        assert!(replace_output(&dir, "mem_file_path").unwrap_err().contains("a directory"));
    }

    #[test]
    fn only_a_socket_is_removed() {
        let dir = scratch("socket");
        let file = dir.join("regular");
        std::fs::write(&file, b"keep me").unwrap();
        let e = remove_stale_socket(&file, "uds_path").unwrap_err();
        assert!(e.contains("a regular file, not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let sock = dir.join("sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        remove_stale_socket(&sock, "uds_path").unwrap();
        assert!(!sock.exists());
        remove_stale_socket(&sock, "uds_path").unwrap();
    }

    #[test]
    fn inputs_must_be_regular_files_of_bounded_size() {
        let dir = scratch("inputs");
        let fifo = dir.join("state.fifo");
        mkfifo(&fifo);
        // Neither waits for a writer nor reads without end.
        assert!(read_regular(&fifo, "snapshot_path", 1 << 20).unwrap_err().contains("is a FIFO; give a regular file"));
        assert!(
            read_regular(Path::new("/dev/zero"), "snapshot_path", 1 << 20).unwrap_err().contains("character device")
        );
        let big = dir.join("big");
        std::fs::write(&big, vec![0u8; 4097]).unwrap();
        assert!(read_regular(&big, "--config-file", 4096).unwrap_err().contains("more than the 4096"));
        assert_eq!(read_regular(&big, "--config-file", 4097).unwrap().len(), 4097);
    }

    #[test]
    fn drives_are_files_or_block_devices() {
        assert!(check_drive(Path::new("/dev/null"), "path_on_host").unwrap_err().contains("character device"));
        assert!(check_drive(Path::new("/"), "path_on_host").unwrap_err().contains("directory"));
    }
}
