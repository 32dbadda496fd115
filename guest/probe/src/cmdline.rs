//! The probe learns everything from its command line: which tests to run, their parameters,
//! and the virtio-mmio devices the VMM announced. Pure code, unit-tested on the host.

/// A virtio-mmio device announced as `virtio_mmio.device=SIZE@BASE:IRQ[:ID]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Clone, Copy)]
pub struct Cmdline<'a> {
    text: &'a str,
}

impl<'a> Cmdline<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text }
    }

    fn values(self, key: &'a str) -> impl Iterator<Item = &'a str> {
        self.text.split_ascii_whitespace().filter_map(move |word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// The tests named by every `probe.test=a,b,c`, in order.
    pub fn tests(self) -> impl Iterator<Item = &'a str> {
        self.values("probe.test").flat_map(|list| list.split(',')).filter(|t| !t.is_empty())
    }

    /// The last `probe.<test>.<name>=value`.
    pub fn param(self, test: &str, name: &str) -> Option<&'a str> {
        self.text.split_ascii_whitespace().rev().find_map(|word| {
            let (k, v) = word.split_once('=')?;
            let rest = k.strip_prefix("probe.")?.strip_prefix(test)?.strip_prefix('.')?;
            (rest == name).then_some(v)
        })
    }

    /// A numeric parameter, with `default` when absent or malformed.
    pub fn number(self, test: &str, name: &str, default: u64) -> u64 {
        self.param(test, name).and_then(parse_number).unwrap_or(default)
    }

    /// Whether the word `probe.<name>=on` is present.
    pub fn switch(self, name: &str) -> bool {
        self.text
            .split_ascii_whitespace()
            .any(|w| w.strip_prefix("probe.").and_then(|r| r.strip_prefix(name)) == Some("=on"))
    }

    /// The devices of every well-formed `virtio_mmio.device=` entry.
    pub fn virtio_mmio_devices(self) -> impl Iterator<Item = VirtioMmioSlot> + 'a {
        self.values("virtio_mmio.device").filter_map(parse_virtio_mmio)
    }
}

/// `SIZE@BASE:IRQ[:ID]`, numbers as the kernel's memparse reads them.
pub fn parse_virtio_mmio(spec: &str) -> Option<VirtioMmioSlot> {
    let (size, rest) = spec.split_once('@')?;
    let mut parts = rest.split(':');
    let base = parse_number(parts.next()?)?;
    let irq = parse_number(parts.next()?)?;
    let size = parse_number(size)?;
    if size == 0 || base.checked_add(size).is_none() || irq > u64::from(u32::MAX) {
        return None;
    }
    Some(VirtioMmioSlot { base, size, irq: irq as u32 })
}

/// Decimal or 0x-hex, with an optional K, M or G suffix.
pub fn parse_number(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u64>().ok()?,
    };
    value.checked_mul(1u64 << shift)
}
