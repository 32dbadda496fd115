//! The descriptor walk and virtio-blk's request parsing, on a driver-written ring.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueOwnedT;

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = ferrovisor_fuzz::guest_with_queue(data);
    let Ok(chains) = queue.iter(&mem) else { return };
    // The walk ends however the ring is laid out: at most a queue's worth of chains.
    for chain in chains.take(64) {
        let (request, _status) = virtio::blk::parse_request(&mem, chain);
        if let Ok(request) = request {
            // The bound the device announces (size_max) holds for whatever the ring says.
            assert!(request.data_len <= virtio::blk::MAX_REQUEST_BYTES);
            assert!(request.data.iter().map(|&(_, len)| u64::from(len)).sum::<u64>() == u64::from(request.data_len));
        }
    }
});
