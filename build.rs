//! Builds the probe guest (guest/probe) with the same rustc, as a freestanding ELF with a PVH
//! note. It is no Cargo target of its own: a no_std binary needs panic=abort and link flags
//! that would apply to the whole workspace. Tests find it through FERROVISOR_PROBE_ELF; a copy
//! lands at target/<profile>/probe.elf for running it by hand.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let probe = root.join("guest/probe");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let elf = out_dir.join("probe.elf");
    println!("cargo:rerun-if-changed=guest/probe/src");
    println!("cargo:rerun-if-changed=guest/probe/linker.ld");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let link_args = [
        // GNU ld: rust-lld keeps core's unwinding references alive and fails to link.
        "-fuse-ld=bfd".to_string(),
        "-nostartfiles".into(),
        "-nostdlib".into(),
        "-static".into(),
        "-no-pie".into(),
        "-Wl,--build-id=none".into(),
        "-Wl,-n".into(),
        format!("-Wl,-T,{}", probe.join("linker.ld").display()),
    ];
    let mut cmd = Command::new(rustc);
    cmd.args(["--edition", "2024", "--crate-type", "bin", "--crate-name", "probe"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["-C", "panic=abort", "-C", "opt-level=2", "-C", "codegen-units=1", "-C", "debuginfo=0"])
        .args(["-D", "warnings"])
        .arg(probe.join("src/main.rs"))
        .arg("-o")
        .arg(&elf);
    for arg in &link_args {
        cmd.arg("-C").arg(format!("link-arg={arg}"));
    }
    let status = cmd.status().expect("rustc runs");
    assert!(status.success(), "building the probe guest (guest/probe) failed");
    println!("cargo:rustc-env=FERROVISOR_PROBE_ELF={}", elf.display());
    // OUT_DIR is target/<profile>/build/<package>-<hash>/out.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = std::fs::copy(&elf, profile_dir.join("probe.elf"));
    }
}
