//! Host programs the VMM runs (`ip`, `nft`, `bridge`, `sysctl`, its own DHCP server): they get
//! stdin, stdout and stderr and no other fd, whatever the VMM holds or inherited.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// A command for `program` whose child keeps only fds 0 to 2 across exec.
pub fn helper_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: close_range is async-signal-safe. Marking the fds close-on-exec rather than
    // closing them keeps the pipe std uses to report a failed exec working until the exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stdio_reaches_the_helper() {
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two new fds into the array; dup2 moves them (inheritable) to
        // numbers that the listing's own fd cannot take.
        let fds = unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            [libc::dup2(pipe[0], 100), libc::dup2(pipe[1], 101)]
        };
        let listing = |mut cmd: Command| {
            let out = cmd.args(["-c", "ls /proc/self/fd"]).output().unwrap();
            String::from_utf8(out.stdout).unwrap().split_whitespace().map(|f| f.parse().unwrap()).collect::<Vec<i32>>()
        };
        assert!(listing(Command::new("sh")).contains(&fds[0]), "a plain Command passes the pipe on");
        let seen = listing(helper_command("sh"));
        assert!(!seen.contains(&fds[0]) && !seen.contains(&fds[1]), "{seen:?}");
        // SAFETY: closing the fds this test made.
        unsafe {
            for fd in pipe.into_iter().chain(fds) {
                libc::close(fd);
            }
        }
    }
}
