//! The built-in DHCP server: client packets, parsed and answered from one pool and lease table.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pool = net::dhcp::Pool {
        gateway: Ipv4Addr::new(10, 0, 5, 1),
        prefix: 24,
        first: Ipv4Addr::new(10, 0, 5, 2),
        last: Ipv4Addr::new(10, 0, 5, 254),
    };
    let mut leases = net::dhcp::Leases::default();
    // Several packets per input: lengths in the first byte of each.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (usize::from(len) * 4).min(tail.len());
        if let Some(msg) = net::dhcp::parse(&tail[..len]) {
            if let Some(reply) = net::dhcp::answer(&pool, &mut leases, &msg) {
                assert!(reply.len() <= 576, "a reply fits a minimum IPv4 datagram");
            }
        }
        rest = &tail[len..];
    }
});
