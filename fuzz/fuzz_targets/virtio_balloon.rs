//! virtio-balloon: inflate, deflate, statistics and free page reporting over driver-written
//! rings, with the statistics timer firing in between.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (script, ram) = ferrovisor_fuzz::split_control(data, 32);
    let (mem, mut queues) = ferrovisor_fuzz::guest_with_queues(ram, 4);
    virtio::balloon::fuzz_queues(&mem, &mut queues, script);
});
