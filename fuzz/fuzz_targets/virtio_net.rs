//! virtio-net: transmit, receive and control commands over driver-written rings, with frames
//! arriving from the host side in between.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (script, ram) = ferrovisor_fuzz::split_control(data, 64);
    let (mem, mut queues) = ferrovisor_fuzz::guest_with_queues(ram, 3);
    virtio::net::fuzz_queues(&mem, &mut queues, script);
});
