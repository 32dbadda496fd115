//! `virtio-balloon`: honour the host's inflate request. The probe prints
//! `PROBE virtio-balloon ready`, waits for a non-zero target (`num_pages`), gives that many
//! pages from 16 MiB up to the device, and sets `actual`.
//!
//! With `probe.virtio-balloon.mode=hint` it does free page hinting instead: it fills `.mib`
//! (32) MiB from 16 MiB up, prints `PROBE virtio-balloon hint ready`, waits for the host to
//! start a run (a command ID of 2 or more in the config space), sends that ID, hints the
//! filled range as free in 1 MiB buffers, sends STOP, and waits for the host's DONE.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::virtio::mmio::Device;
use crate::virtio::queue::Buffer;
use crate::virtio::{alloc, bytes};
use crate::{hw, report};

const TEST: &str = "virtio-balloon";
const INFLATE_QUEUE: u16 = 0;
const CONFIG_NUM_PAGES: u64 = 0;
const CONFIG_ACTUAL: u64 = 4;
/// Page frame numbers per inflate request.
const BATCH: usize = 256;
/// The balloon takes pages from here up: above the probe's image and arena.
const FIRST_PAGE: u64 = (16 << 20) >> 12;

const F_FREE_PAGE_HINT: u64 = 1 << 3;
const CONFIG_HINT_CMD: u64 = 8;
const CMD_STOP: u32 = 0;
const CMD_DONE: u32 = 1;
const HINT_QUEUE: u16 = 2;

fn hint(slot: &VirtioMmioSlot, cmdline: Cmdline, low_ram_end: u64) -> Result<(), &'static str> {
    let mib = cmdline.number(TEST, "mib", 32);
    let (start, len) = (FIRST_PAGE << 12, mib << 20);
    if start + len > low_ram_end {
        return Err("the probe has less RAM than mib= asks to fill");
    }
    // Touch every page, so that the host holds them.
    for page in (start..start + len).step_by(4096) {
        bytes(page, 8).copy_from_slice(&page.to_le_bytes());
    }
    let dev = Device::begin(slot, F_FREE_PAGE_HINT, 0).map_err(|_| "the device offers no free page hinting")?;
    dev.queue(INFLATE_QUEUE, 8).map_err(|_| "the inflate queue could not be set up")?;
    dev.queue(1, 8).map_err(|_| "the deflate queue could not be set up")?;
    let mut q = dev.queue(HINT_QUEUE, 8).map_err(|_| "the hinting queue could not be set up")?;
    dev.driver_ok();
    crate::println!("PROBE virtio-balloon hint ready");
    let wait = |wanted: &dyn Fn(u32) -> bool| {
        let deadline = hw::rdtsc() + cmdline.number(TEST, "timeout", 20_000_000_000);
        loop {
            let cmd = dev.config_read32(CONFIG_HINT_CMD);
            if wanted(cmd) {
                return Ok(cmd);
            }
            if hw::rdtsc() > deadline {
                return Err("the host never gave the hinting command");
            }
            hw::spin_cycles(1_000_000);
        }
    };
    let run = wait(&|cmd| cmd > CMD_DONE)?;
    let cmd = alloc(4, 4).ok_or("out of probe memory")?;
    let mut send = |buffer: Buffer| {
        q.push(&[buffer]).ok_or("hinting ring full")?;
        dev.notify(HINT_QUEUE);
        dev.wait_used(&mut q, super::request_deadline(cmdline)).ok_or("a hint was not taken").map(|_| ())
    };
    bytes(cmd, 4).copy_from_slice(&run.to_le_bytes());
    send(Buffer::readable(cmd, 4))?;
    for chunk in (start..start + len).step_by(1 << 20) {
        send(Buffer::writable(chunk, 1 << 20))?;
    }
    bytes(cmd, 4).copy_from_slice(&CMD_STOP.to_le_bytes());
    send(Buffer::readable(cmd, 4))?;
    wait(&|cmd| cmd == CMD_DONE)?;
    report::ok(TEST, format_args!("mode=hint run={run} hinted_mib={mib}"));
    Ok(())
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline, low_ram_end: u64) -> Result<(), &'static str> {
    if cmdline.param(TEST, "mode") == Some("hint") {
        return hint(slot, cmdline, low_ram_end);
    }
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    let mut q = dev.queue(INFLATE_QUEUE, 8).map_err(|_| "the inflate queue could not be set up")?;
    dev.queue(1, 8).map_err(|_| "the deflate queue could not be set up")?;
    dev.driver_ok();
    crate::println!("PROBE virtio-balloon ready");
    let deadline = hw::rdtsc() + cmdline.number(TEST, "timeout", 20_000_000_000);
    let target = loop {
        let pages = dev.config_read32(CONFIG_NUM_PAGES);
        if pages != 0 {
            break u64::from(pages);
        }
        if hw::rdtsc() > deadline {
            return Err("the host never asked for pages");
        }
        hw::spin_cycles(1_000_000);
    };
    if FIRST_PAGE + target > low_ram_end >> 12 {
        return Err("the host asks for more pages than the probe can spare");
    }
    let pfns = alloc(BATCH * 4, 64).ok_or("out of probe memory")?;
    let mut given = 0u64;
    while given < target {
        let n = (target - given).min(BATCH as u64) as usize;
        for (i, slot) in bytes(pfns, n * 4).chunks_exact_mut(4).enumerate() {
            slot.copy_from_slice(&((FIRST_PAGE + given + i as u64) as u32).to_le_bytes());
        }
        q.push(&[Buffer::readable(pfns, (n * 4) as u32)]).ok_or("inflate ring full")?;
        dev.notify(INFLATE_QUEUE);
        dev.wait_used(&mut q, super::request_deadline(cmdline)).ok_or("an inflate request was not taken")?;
        given += n as u64;
        dev.write(crate::virtio::mmio::REG_CONFIG + CONFIG_ACTUAL, given as u32);
    }
    report::ok(TEST, format_args!("inflated_pages={given} mib={}", given >> 8));
    Ok(())
}
