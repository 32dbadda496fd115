//! `jailer`: Firecracker's jailer for Ferrovisor (see the jailer crate).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = jailer::Args::parse();
    match jailer::run(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("jailer: error: {e}");
            ExitCode::from(1)
        }
    }
}
