//! The tests the probe offers, by name.

mod cpuid;
mod dirty;
mod dma_engine;
mod fault;
mod hostile;
mod hostile_net;
mod hostile_pci;
mod hostile_queues;
mod i8042;
mod memfill;
mod serial;
pub mod smp;
mod virtio;

use crate::cmdline::Cmdline;
use crate::pvh::StartInfo;
use crate::report;

/// Runs one named test.
pub fn run(name: &str, cmdline: Cmdline, info: &StartInfo) {
    match name {
        "smp" => smp::run(cmdline),
        "serial" => serial::run(cmdline),
        "memfill" => memfill::run(cmdline, info),
        "dirty" => dirty::run(cmdline, info),
        "fault" => fault::run(),
        "cpuid" => cpuid::run(cmdline),
        "hostile" => hostile::run(cmdline),
        "hostile-net" => hostile_net::run(cmdline),
        "hostile-pci" => hostile_pci::run(cmdline),
        "dma-engine" => dma_engine::run(cmdline),
        "hostile-vsock" | "hostile-balloon" | "hostile-console" | "hostile-rng" => hostile_queues::run(name, cmdline),
        "i8042" => i8042::run(cmdline),
        "tsc" => match crate::tsc::khz(cmdline) {
            Some(khz) => report::ok("tsc", format_args!("khz={khz}")),
            None => report::fail("tsc", format_args!("the CMOS clock never ticked")),
        },
        _ => match virtio::device_id(name) {
            Some(id) => virtio::run(name, id, cmdline, info),
            None => report::fail(name, format_args!("unknown test")),
        },
    }
}
