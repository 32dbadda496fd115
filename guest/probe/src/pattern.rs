//! The data patterns the probe writes, shared with host-side tests that check them.

/// splitmix64: a well-mixed 64-bit value from any input.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills one 512-byte disk sector with the pattern for (`seed`, `sector`).
pub fn fill_sector(seed: u64, sector: u64, out: &mut [u8]) {
    for (j, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix(seed.wrapping_mul(0x1000_0000_01b3) ^ (sector << 6 | j as u64)).to_le_bytes());
    }
}

/// FNV-1a over bytes, continuing from `hash` (start with FNV_OFFSET).
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The EtherType of probe frames (IEEE 802 local experimental).
pub const ETHERTYPE_PROBE: u16 = 0x88b5;

/// Frame `index` of a probe transmission: broadcast from `mac`, `len` bytes (at least 60).
pub fn fill_frame(seed: u64, index: u64, mac: [u8; 6], out: &mut [u8]) {
    out[0..6].fill(0xff);
    out[6..12].copy_from_slice(&mac);
    out[12..14].copy_from_slice(&ETHERTYPE_PROBE.to_be_bytes());
    for (k, byte) in out[14..].iter_mut().enumerate() {
        *byte = mix(seed ^ (index << 32) ^ (k as u64 >> 3)).to_le_bytes()[k & 7];
    }
}
