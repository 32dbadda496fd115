//! The migration stream: frames of a kind byte, three zero bytes, a little-endian u32 length and
//! the payload. Every kind has a size bound, checked before anything is allocated, so that a
//! hostile peer cannot make the other side allocate more than the bound.
//!
//! The source sends `Hello`, `Config`, then `Pages` (round after round), `State` and `End`; the
//! destination answers `Ack` once the VM runs there, or `Error` with a sentence.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Bumped whenever the stream changes; a destination refuses a version it does not know.
pub const VERSION: u32 = 1;
const MAGIC: &str = "ferrovisor-migration";
pub const PAGE: usize = 4096;
/// The most page data in one `Pages` frame.
pub const MAX_PAGES_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Config = 2,
    /// A guest address (u64), then whole pages from there.
    Pages = 3,
    /// A snapshot's state file (`snapshot::signed`).
    State = 4,
    End = 5,
    Ack = 6,
    /// A sentence.
    Error = 7,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Config,
            3 => Kind::Pages,
            4 => Kind::State,
            5 => Kind::End,
            6 => Kind::Ack,
            7 => Kind::Error,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    fn max_len(self) -> usize {
        match self {
            Kind::Hello | Kind::Error => 4096,
            Kind::Config => 1 << 20,
            Kind::Pages => 8 + MAX_PAGES_BYTES,
            Kind::State => crate::snapshot::MAX_STATE_FILE as usize,
            Kind::End | Kind::Ack => 0,
        }
    }
}

/// The first frame's payload.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    pub vmm_version: String,
}

impl Hello {
    pub fn ours() -> Hello {
        Hello { magic: MAGIC.into(), version: VERSION, vmm_version: env!("CARGO_PKG_VERSION").into() }
    }

    /// Checks a peer's hello; the error says what to do.
    pub fn check(payload: &[u8]) -> Result<(), String> {
        let hello: Hello =
            serde_json::from_slice(payload).map_err(|_| "the peer does not speak Ferrovisor's migration stream")?;
        if hello.magic != MAGIC {
            return Err("the peer does not speak Ferrovisor's migration stream".into());
        }
        if hello.version != VERSION {
            return Err(format!(
                "the source sends stream version {} (Ferrovisor {}), and this Ferrovisor {} reads only version {VERSION}; \
                 migrate between versions that share a stream version",
                hello.version,
                hello.vmm_version,
                env!("CARGO_PKG_VERSION")
            ));
        }
        Ok(())
    }
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    debug_assert!(payload.len() <= kind.max_len());
    let mut header = [0u8; 8];
    header[0] = kind as u8;
    header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)
}

/// A `Pages` frame for the pages at `gpa`.
pub fn write_pages(w: &mut impl Write, gpa: u64, pages: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 16];
    header[0] = Kind::Pages as u8;
    header[4..8].copy_from_slice(&((8 + pages.len()) as u32).to_le_bytes());
    header[8..].copy_from_slice(&gpa.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(pages)
}

/// Reads one frame into `buf` (reused across frames); the payload is `buf[..len]`.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, String> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).map_err(|e| format!("the stream ended or failed ({e})"))?;
    let kind = Kind::from_byte(header[0]).ok_or(format!("the stream holds an unknown frame kind {}", header[0]))?;
    if header[1..4] != [0, 0, 0] {
        return Err("the stream holds a damaged frame header".into());
    }
    let len = u32::from_le_bytes(header[4..].try_into().expect("four bytes")) as usize;
    if len > kind.max_len() {
        return Err(format!("a {kind:?} frame of {len} bytes is larger than the {} allowed", kind.max_len()));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| format!("the stream ended inside a {kind:?} frame ({e})"))?;
    Ok(kind)
}

/// Splits a `Pages` payload into its guest address and whole pages.
pub fn pages(payload: &[u8]) -> Result<(u64, &[u8]), String> {
    let (gpa, data) = payload.split_at_checked(8).ok_or("a Pages frame has no address")?;
    let gpa = u64::from_le_bytes(gpa.try_into().expect("eight bytes"));
    if data.is_empty() || !data.len().is_multiple_of(PAGE) || !gpa.is_multiple_of(PAGE as u64) {
        return Err(format!("a Pages frame at {gpa:#x} is not whole, aligned pages"));
    }
    Ok((gpa, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_or_unknown_ones_are_refused_unread() {
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Hello, &serde_json::to_vec(&Hello::ours()).unwrap()).unwrap();
        write_pages(&mut out, 0x2000, &[7u8; 8192]).unwrap();
        write_frame(&mut out, Kind::End, &[]).unwrap();
        let mut r = out.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf), Ok(Kind::Hello));
        Hello::check(&buf).unwrap();
        assert_eq!(read_frame(&mut r, &mut buf), Ok(Kind::Pages));
        let (gpa, data) = pages(&buf).unwrap();
        assert_eq!((gpa, data.len()), (0x2000, 8192));
        assert_eq!(read_frame(&mut r, &mut buf), Ok(Kind::End));
        assert!(read_frame(&mut r, &mut buf).unwrap_err().contains("ended"));

        let huge = [Kind::Hello as u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_frame(&mut huge.as_slice(), &mut buf).unwrap_err().contains("larger than"));
        assert!(buf.capacity() < 1 << 20, "nothing was allocated for it");
        assert!(read_frame(&mut [9u8, 0, 0, 0, 0, 0, 0, 0].as_slice(), &mut buf).unwrap_err().contains("unknown"));
        assert!(pages(&[0u8; 8 + 100]).is_err());
        assert!(pages(&[1u8; 8 + 4096]).is_err(), "misaligned");
    }

    #[test]
    fn another_stream_version_is_refused_with_both_versions_named() {
        let hello = Hello { version: VERSION + 1, ..Hello::ours() };
        let e = Hello::check(&serde_json::to_vec(&hello).unwrap()).unwrap_err();
        assert!(e.contains(&format!("version {}", VERSION + 1)) && e.contains("reads only version"), "{e}");
        assert!(Hello::check(b"{}").is_err());
    }
}
