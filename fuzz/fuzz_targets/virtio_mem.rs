//! virtio-mem: plug, unplug and state requests over a driver-written ring.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kicks, ram)) = data.split_first() else { return };
    let (mem, mut queues) = ferrovisor_fuzz::guest_with_queues(ram, 1);
    virtio::mem::fuzz_queues(&mem, &mut queues, usize::from(kicks % 4) + 1);
});
