//! A hostile vhost-user front-end against the relay in front of Ferrovisor's back-ends: the
//! input is everything the front-end says. Nothing it says may panic the relay, make it
//! allocate without bound, or hang it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_user::backend::fuzz_relay(data);
});
