//! `ferrovisor ksm on|off|status`: the host's KSM daemon and what it shares.

use std::process::ExitCode;

use super::EXIT_FAILURE;

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_value(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("{KSM}/{name}")).ok()?.trim().parse().ok()
}

#[derive(clap::Args)]
pub struct KsmArgs {
    #[arg(value_parser = ["on", "off", "status"])]
    action: String,
}

pub fn ksm(args: KsmArgs) -> ExitCode {
    let action = args.action.as_str();
    if !std::path::Path::new(KSM).exists() {
        eprintln!("error: this host's kernel has no KSM ({KSM} is missing); build it with CONFIG_KSM.");
        return ExitCode::from(EXIT_FAILURE);
    }
    if action != "status" {
        let value = if action == "on" { "1" } else { "0" };
        if let Err(e) = std::fs::write(format!("{KSM}/run"), value) {
            eprintln!("error: cannot turn KSM {action} ({e}); run as root.");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    let page_kib = 4;
    let sharing = ksm_value("pages_sharing").unwrap_or(0);
    println!(
        "ksm: run={} pages_shared={} pages_sharing={} saved_mib={} full_scans={} general_profit_mib={}",
        ksm_value("run").unwrap_or(0),
        ksm_value("pages_shared").unwrap_or(0),
        sharing,
        sharing * page_kib / 1024,
        ksm_value("full_scans").unwrap_or(0),
        ksm_value("general_profit").unwrap_or(0) >> 20,
    );
    ExitCode::SUCCESS
}
