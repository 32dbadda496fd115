//! Snapshot files without a VM: `ferrovisor snapshot-merge`, `--describe-snapshot` and
//! `--snapshot-version`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::failure;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The full snapshot's memory file; it is overwritten with the diff's pages.
    #[arg(long)]
    base: PathBuf,
    /// The diff snapshot's memory file.
    #[arg(long)]
    diff: PathBuf,
}

/// Applies a diff snapshot's memory file onto a base memory file, in place.
pub fn merge(args: MergeArgs) -> ExitCode {
    match vmm::snapshot::merge_memory(&args.base, &args.diff) {
        Ok(bytes) => {
            println!("merged {} pages of {} into {}", bytes / 4096, args.diff.display(), args.base.display());
            ExitCode::SUCCESS
        }
        Err(e) => failure(format!("{e}.")),
    }
}

/// Prints the format version of the snapshot state file `path`.
pub fn describe(path: &Path) -> ExitCode {
    match vmm::snapshot::describe(path) {
        Ok(version) => {
            println!("{version}");
            ExitCode::SUCCESS
        }
        Err(e) => failure(format!("--describe-snapshot: {e}.")),
    }
}

/// Prints the snapshot format version this Ferrovisor writes.
pub fn version() -> ExitCode {
    println!("v{}.0.0", vmm::snapshot::FORMAT_VERSION);
    ExitCode::SUCCESS
}
