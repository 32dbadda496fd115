//! `cpuid`: reports CPUID leaves as the VM defines them (subleaf 0, run in ring 0), for
//! checking what a CPU template changed. `probe.cpuid.leaves=0x1:0x7` (the default) names them.

use crate::cmdline::Cmdline;
use crate::{hw, report};

pub fn run(cmdline: Cmdline) {
    let leaves = cmdline.param("cpuid", "leaves").unwrap_or("0x1:0x7");
    for leaf in leaves.split(':') {
        let Some(number) = crate::cmdline::parse_number(leaf).and_then(|n| u32::try_from(n).ok()) else {
            return report::fail("cpuid", format_args!("'{leaf}' is not a leaf number"));
        };
        let r = hw::vm_cpuid(number, 0);
        crate::println!(
            "PROBE cpuid leaf={number:#x} eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
            r.eax,
            r.ebx,
            r.ecx,
            r.edx
        );
    }
    report::ok("cpuid", format_args!("leaves={leaves}"));
}
