//! A relay between a front-end and vhost-user-backend's request handler, for one message order
//! the handler refuses and QEMU uses: QEMU 7.2's virtio-net enables its rings
//! (SET_VRING_ENABLE) before it sets the features, once, and the handler wants
//! PROTOCOL_FEATURES acknowledged first. The relay answers such early enables itself and hands
//! them to the handler right after the features. Every other message passes through
//! unchanged, file descriptors included. Messages are bounded as vhost-user bounds them.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::MAX_MSG_SIZE;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_LEN: usize = 12;
/// The most descriptors one message carries (a memory table's regions).
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The most early enables kept (one per ring of the largest device, twice over).
const MAX_EARLY_ENABLES: usize = 2 * 64;

struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.header[0], self.header[1], self.header[2], self.header[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.header[4], self.header[5], self.header[6], self.header[7]])
    }

    /// The message as sent again by the relay: its answer was given already.
    fn without_reply(mut self) -> Message {
        let flags = self.flags() & !FLAG_NEED_REPLY;
        self.header[4..8].copy_from_slice(&flags.to_le_bytes());
        self
    }
}

/// The next message on `sock`; None when the peer hung up.
fn read_message(mut sock: &UnixStream) -> std::io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: HEADER_LEN }];
    // SAFETY: the iovec points at `header`, which outlives the call, with its length.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg gave this process the first `nfds` descriptors; each is owned once.
    let fds = raw_fds[..nfds].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    if n == 0 {
        return Ok(None);
    }
    sock.read_exact(&mut header[n..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_MSG_SIZE {
        return Err(std::io::Error::other(format!("a {size}-byte message is beyond vhost-user's {MAX_MSG_SIZE}")));
    }
    let mut payload = vec![0u8; size];
    sock.read_exact(&mut payload)?;
    Ok(Some(Message { header, payload, fds }))
}

fn write_message(mut sock: &UnixStream, message: &Message) -> std::io::Result<()> {
    let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let whole = [&message.header[..], &message.payload[..]].concat();
    let sent = sock.send_with_fds(&[&whole[..]], &fds).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    sock.write_all(&whole[sent..])
}

/// The acknowledgement of `request` (REPLY_ACK): success.
fn ack(request: &Message) -> Message {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&request.request().to_le_bytes());
    header[4..8].copy_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
    header[8..12].copy_from_slice(&8u32.to_le_bytes());
    Message { header, payload: 0u64.to_le_bytes().to_vec(), fds: Vec::new() }
}

/// Relays between `front` (the front-end) and `back` (the request handler) until either hangs
/// up or sends what cannot be a message; both are shut down then.
pub fn run(front: UnixStream, back: UnixStream) {
    if let Err(e) = relay(&front, &back) {
        tracing::warn!("vhost-user: the front-end's connection ends ({e})");
    }
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = back.shutdown(std::net::Shutdown::Both);
}

fn relay(front: &UnixStream, back: &UnixStream) -> std::io::Result<()> {
    let mut features_set = false;
    let mut early_enables = Vec::new();
    loop {
        let mut polled = [
            libc::pollfd { fd: front.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: back.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll reads and writes the two pollfd entries of the array it is given.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if polled[0].revents != 0 {
            let Some(message) = read_message(front)? else { return Ok(()) };
            match message.request() {
                SET_VRING_ENABLE if !features_set => {
                    if message.flags() & FLAG_NEED_REPLY != 0 {
                        write_message(front, &ack(&message))?;
                    }
                    if early_enables.len() < MAX_EARLY_ENABLES {
                        early_enables.push(message.without_reply());
                    }
                    continue;
                }
                SET_FEATURES if !features_set => {
                    features_set = true;
                    write_message(back, &message)?;
                    for enable in early_enables.drain(..) {
                        write_message(back, &enable)?;
                    }
                    continue;
                }
                _ => {}
            }
            write_message(back, &message)?;
        }
        if polled[1].revents != 0 {
            let Some(message) = read_message(back)? else { return Ok(()) };
            write_message(front, &message)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn early_enables_are_answered_and_the_rest_goes_through() {
        let (mut frontend, front) = UnixStream::pair().unwrap();
        let (back, mut handler) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || run(front, back));
        // An enable before the features: answered by the relay, and handed on after them.
        let early = message(SET_VRING_ENABLE, VERSION_1 | FLAG_NEED_REPLY, &[0, 0, 0, 0, 1, 0, 0, 0]);
        frontend.write_all(&early).unwrap();
        let mut reply = [0u8; 20];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..], &message(SET_VRING_ENABLE, VERSION_1 | FLAG_REPLY, &[0; 8])[..]);
        let features = message(SET_FEATURES, VERSION_1, &[7; 8]);
        let enable = message(SET_VRING_ENABLE, VERSION_1, &[1; 8]);
        frontend.write_all(&features).unwrap();
        frontend.write_all(&enable).unwrap();
        let replayed = message(SET_VRING_ENABLE, VERSION_1, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let mut seen = vec![0u8; features.len() + replayed.len() + enable.len()];
        handler.read_exact(&mut seen).unwrap();
        assert_eq!(seen, [features, replayed, enable].concat());
        // A reply comes back; an oversized message ends the relay.
        let answer = message(1, VERSION_1 | FLAG_REPLY, &[3; 8]);
        handler.write_all(&answer).unwrap();
        let mut got = vec![0u8; answer.len()];
        frontend.read_exact(&mut got).unwrap();
        assert_eq!(got, answer);
        let mut huge = message(1, VERSION_1, &[]);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        frontend.write_all(&huge).unwrap();
        relay.join().unwrap();
        assert_eq!(handler.read(&mut [0u8; 1]).unwrap(), 0, "the handler's side is shut down");
    }
}
