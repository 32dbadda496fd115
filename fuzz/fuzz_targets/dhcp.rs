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
    // Several packets per input: a length, a port and a clock step before each.
    let mut rest = data;
    let mut now = 1_000_000u64;
    while let [len, port, step, tail @ ..] = rest {
        let len = (usize::from(*len) * 4).min(tail.len());
        now += u64::from(*step) * 60;
        if let Some(msg) = net::dhcp::parse(&tail[..len])
            && let Some(reply) = net::dhcp::answer(&pool, &mut leases, &msg, u32::from(*port % 8), now)
        {
            assert!(reply.len() <= 576, "a reply fits a minimum IPv4 datagram");
        }
        rest = &tail[len..];
        assert!(leases.len() <= 253);
    }
});
