//! The microVM metadata service (MMDS) as Firecracker serves it: a JSON store the host fills
//! through the API, read by the guest with HTTP at a link-local address (169.254.169.254 by
//! default). Frames a guest sends to that address on an interface MMDS is enabled for never
//! reach the host: a small TCP/IP stack (smoltcp) in the VMM answers them.
//!
//! Version 1 answers every GET; version 2 first wants `PUT /latest/api/token` with a lifetime
//! and then that token on every GET. Values come back in IMDS form (a string as it is, an
//! object as its keys, one per line, objects with a trailing `/`) or as JSON with
//! `Accept: application/json`.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Firecracker's default limit for the store, in bytes of JSON.
pub const DEFAULT_SIZE_LIMIT: usize = 51200;
/// The address MMDS answers ARP with.
const MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const MAX_TOKEN_TTL_S: u64 = 21600;
const MAX_TOKENS: usize = 4096;
/// A request head and body past this is refused.
const MAX_REQUEST: usize = 8 << 10;
const LISTENERS: usize = 4;
const MAX_SOCKETS: usize = 32;
const MAX_QUEUED_FRAMES: usize = 256;
const MTU: usize = 1514;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Version {
    #[default]
    V1,
    V2,
}

/// The metadata store and how the guest may read it.
pub struct Store {
    data: Value,
    limit: usize,
    pub version: Version,
    pub imds_compat: bool,
    /// Session tokens (V2) and when they expire.
    tokens: HashMap<String, Instant>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            data: Value::Object(Default::default()),
            limit: DEFAULT_SIZE_LIMIT,
            version: Version::V1,
            imds_compat: false,
            tokens: HashMap::new(),
        }
    }
}

/// The process's store: one VMM runs one VM.
pub fn store() -> &'static Mutex<Store> {
    static STORE: OnceLock<Mutex<Store>> = OnceLock::new();
    STORE.get_or_init(Mutex::default)
}

/// Runs `f` on the process's store.
pub fn with_store<T>(f: impl FnOnce(&mut Store) -> T) -> T {
    f(&mut store().lock().unwrap_or_else(|p| p.into_inner()))
}

impl Store {
    pub fn data(&self) -> &Value {
        &self.data
    }

    pub fn set_limit(&mut self, bytes: usize) {
        self.limit = bytes;
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Replaces the contents, which must be a JSON object (as Firecracker's API defines them).
    pub fn put(&mut self, data: Value) -> Result<(), String> {
        must_be_object(&data)?;
        self.fits(&data)?;
        self.data = data;
        Ok(())
    }

    /// Applies a JSON merge patch (RFC 7396) to the contents; the patch too must be an object
    /// (any other value would replace the contents whole).
    pub fn patch(&mut self, patch: &Value) -> Result<(), String> {
        must_be_object(patch)?;
        let mut data = self.data.clone();
        merge_patch(&mut data, patch);
        self.fits(&data)?;
        self.data = data;
        Ok(())
    }

    fn fits(&self, data: &Value) -> Result<(), String> {
        let size = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
        if size > self.limit {
            return Err(format!(
                "the MMDS contents would take {size} bytes, more than its limit of {}; send less or raise \
                 --mmds-size-limit",
                self.limit
            ));
        }
        Ok(())
    }

    /// A new session token, or None when the host has no randomness to make one unguessable.
    fn new_token(&mut self, ttl: Duration, now: Instant) -> Option<String> {
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            // The one closest to expiring goes: a guest cannot grow the table without end.
            if let Some(oldest) = self.tokens.iter().min_by_key(|(_, e)| **e).map(|(t, _)| t.clone()) {
                self.tokens.remove(&oldest);
            }
        }
        let mut random = [0u8; 24];
        // SAFETY: getrandom writes at most 24 bytes into the 24-byte buffer.
        let got = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
        if got != random.len() as isize {
            return None;
        }
        let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens.insert(token.clone(), now + ttl);
        Some(token)
    }

    fn token_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|expiry| *expiry > now)
    }
}

/// The contents and their patches are JSON objects: their top level names the data.
fn must_be_object(value: &Value) -> Result<(), String> {
    let kind = match value {
        Value::Object(_) => return Ok(()),
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    };
    Err(format!("the body must be a JSON object, not {kind}; send one like {{\"latest\": {{\"meta-data\": {{}}}}}}"))
}

/// RFC 7396: objects merge key by key, null removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(map) = target else { return };
    for (key, value) in changes {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// An HTTP answer for the guest.
fn response(status: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    let allow = if status == 405 { "Allow: GET, PUT\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\n{allow}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn error(status: u16, reason: &str, message: &str) -> Vec<u8> {
    response(status, reason, "text/plain", message)
}

/// Answers one HTTP request from the guest, or None while `request` is not whole yet.
pub fn respond(store: &mut Store, request: &[u8], now: Instant) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(request) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if request.len() < MAX_REQUEST => return None,
        _ => return Some(error(400, "Bad Request", "The request is not HTTP/1.1 MMDS understands.")),
    };
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let body_len = header("Content-Length").and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
    if head_len + body_len > MAX_REQUEST {
        return Some(error(400, "Bad Request", "The request is too large."));
    }
    if request.len() < head_len + body_len {
        return None;
    }
    let path = parsed.path.unwrap_or("/").split('?').next().unwrap_or("/");
    match parsed.method.unwrap_or("") {
        "PUT" => {
            if path != "/latest/api/token" {
                return Some(error(400, "Bad Request", "PUT is only for /latest/api/token."));
            }
            if header("X-Forwarded-For").is_some() {
                return Some(error(400, "Bad Request", "Token requests must not carry X-Forwarded-For."));
            }
            let ttl = header("X-metadata-token-ttl-seconds")
                .or_else(|| header("X-aws-ec2-metadata-token-ttl-seconds"))
                .and_then(|v| v.trim().parse::<u64>().ok());
            match ttl {
                Some(ttl) if (1..=MAX_TOKEN_TTL_S).contains(&ttl) => {
                    Some(match store.new_token(Duration::from_secs(ttl), now) {
                        Some(token) => response(200, "OK", "text/plain", &token),
                        None => error(500, "Internal Server Error", "No token could be made; try again."),
                    })
                }
                _ => Some(error(
                    400,
                    "Bad Request",
                    "Token lifetime must be given in X-metadata-token-ttl-seconds, from 1 to 21600.",
                )),
            }
        }
        "GET" => {
            let token = header("X-metadata-token").or_else(|| header("X-aws-ec2-metadata-token"));
            if store.version == Version::V2 {
                match token {
                    None => {
                        return Some(error(
                            401,
                            "Unauthorized",
                            "No MMDS token provided. Use `X-metadata-token` header to specify the session token.",
                        ));
                    }
                    Some(t) if !store.token_valid(t.trim(), now) => {
                        return Some(error(401, "Unauthorized", "MMDS token not valid."));
                    }
                    Some(_) => {}
                }
            }
            let pointer = path.trim_end_matches('/');
            let Some(value) = store.data.pointer(pointer) else {
                return Some(error(404, "Not Found", &format!("Resource not found: {path}.")));
            };
            let json = !store.imds_compat && header("Accept").is_some_and(|a| a.contains("application/json"));
            if json {
                return Some(response(200, "OK", "application/json", &value.to_string()));
            }
            match value {
                Value::String(s) => Some(response(200, "OK", "text/plain", s)),
                Value::Object(map) => {
                    let keys: Vec<String> =
                        map.iter().map(|(k, v)| if v.is_object() { format!("{k}/") } else { k.clone() }).collect();
                    Some(response(200, "OK", "text/plain", &keys.join("\n")))
                }
                _ => Some(error(501, "Not Implemented", "Cannot retrieve value. The value has an invalid format.")),
            }
        }
        _ => Some(error(405, "Method Not Allowed", "MMDS takes GET and PUT only.")),
    }
}

/// smoltcp's view of the guest link: frames from the guest, frames for it.
struct Link {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        // A guest that takes no frames cannot make the VMM hold more than this.
        if self.0.len() < MAX_QUEUED_FRAMES {
            self.0.push_back(frame);
        }
        r
    }
}

impl Device for Link {
    type RxToken<'a> = crate::RxFrame;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(crate::RxFrame, Tx<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((crate::RxFrame(frame), Tx(&mut self.to_guest)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.to_guest))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        crate::ethernet_capabilities(MTU)
    }
}

/// A TCP connection to MMDS: its request as received so far, and whether it was answered
/// (one request per connection: the answer closes it).
struct Connection {
    handle: SocketHandle,
    request: Vec<u8>,
    answered: bool,
}

/// MMDS on one network interface: frames to its address go in, its answers come out.
pub struct MmdsStack {
    ip: Ipv4Addr,
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<Connection>,
    started: Instant,
}

impl MmdsStack {
    pub fn new(ip: Ipv4Addr) -> MmdsStack {
        let mut link = Link { from_guest: VecDeque::new(), to_guest: VecDeque::new() };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MAC)));
        config.random_seed = u64::from(std::process::id()) ^ 0x3d5;
        let started = Instant::now();
        let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), 16));
        });
        let mut stack =
            MmdsStack { ip, link, iface, sockets: SocketSet::new(Vec::new()), connections: Vec::new(), started };
        for _ in 0..LISTENERS {
            stack.listen();
        }
        stack
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_millis(self.started.elapsed().as_millis() as i64)
    }

    fn listen(&mut self) {
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 64 << 10]));
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(false);
        if socket.listen(IpListenEndpoint { addr: Some(IpAddress::Ipv4(self.ip)), port: 80 }).is_ok() {
            let handle = self.sockets.add(socket);
            self.connections.push(Connection { handle, request: Vec::new(), answered: false });
        }
    }

    /// Whether `frame` (Ethernet) is for MMDS: an ARP request for its address, or IPv4 to it.
    pub fn wants(&self, frame: &[u8]) -> bool {
        match frame.get(12..14) {
            Some([0x08, 0x06]) => frame.get(38..42) == Some(&self.ip.octets()[..]),
            Some([0x08, 0x00]) => frame.get(30..34) == Some(&self.ip.octets()[..]),
            _ => false,
        }
    }

    /// Takes a frame from the guest and does what it asks.
    pub fn receive(&mut self, frame: &[u8]) {
        if self.link.from_guest.len() < MAX_QUEUED_FRAMES {
            self.link.from_guest.push_back(frame.to_vec());
        }
        self.poll();
    }

    /// The next frame for the guest, left queued until `pop` (the guest may have no buffer).
    pub fn peek(&self) -> Option<&[u8]> {
        self.link.to_guest.front().map(Vec::as_slice)
    }

    pub fn pop(&mut self) {
        self.link.to_guest.pop_front();
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        let mut finished = Vec::new();
        for (i, c) in self.connections.iter_mut().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.handle);
            while socket.can_recv() {
                let request = &mut c.request;
                // Bytes past the largest request are read and dropped: respond() refuses it.
                let taken = socket.recv(|data| {
                    let n = data.len().min((MAX_REQUEST + 1).saturating_sub(request.len()));
                    request.extend_from_slice(&data[..n]);
                    (data.len(), n)
                });
                if taken.is_err() {
                    break;
                }
            }
            if !c.answered
                && !c.request.is_empty()
                && socket.may_send()
                && let Some(answer) = with_store(|s| respond(s, &c.request, Instant::now()))
            {
                let _ = socket.send_slice(&answer);
                socket.close();
                c.answered = true;
            }
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let c = self.connections.remove(i);
            self.sockets.remove(c.handle);
        }
        let listening = self
            .connections
            .iter()
            .filter(|c| self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen)
            .count();
        for _ in listening..LISTENERS {
            if self.connections.len() >= MAX_SOCKETS {
                break;
            }
            self.listen();
        }
        self.iface.poll(now, &mut self.link, &mut self.sockets);
    }
}

/// Guest requests from the fuzzer against a store holding a few values, in both versions.
#[doc(hidden)]
pub fn fuzz_requests(data: &[u8]) {
    let mut store = Store {
        data: serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3, "nested": {"a": "b"}}}}),
        version: if data.first().is_some_and(|b| b & 1 != 0) { Version::V2 } else { Version::V1 },
        ..Store::default()
    };
    let now = Instant::now();
    for request in data.get(1..).unwrap_or_default().split(|&b| b == 0) {
        if let Some(answer) = respond(&mut store, request, now) {
            assert!(answer.starts_with(b"HTTP/1.1 "));
        }
        assert!(store.tokens.len() <= MAX_TOKENS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(store: &mut Store, request: &str) -> (u16, String) {
        let answer = respond(store, request.as_bytes(), Instant::now()).expect("a whole request");
        let text = String::from_utf8(answer).unwrap();
        let status = text[9..12].parse().unwrap();
        (status, text.split_once("\r\n\r\n").unwrap().1.to_string())
    }

    fn store() -> Store {
        let mut s = Store::default();
        s.put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "network": {}, "n": 1}}})).unwrap();
        s
    }

    #[test]
    fn values_come_as_imds_text_or_json() {
        let mut s = store();
        assert_eq!(get(&mut s, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n"), (200, "ami-12345678".into()));
        assert_eq!(get(&mut s, "GET /latest/meta-data/ HTTP/1.1\r\n\r\n"), (200, "ami-id\nn\nnetwork/".into()));
        let json = "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n";
        assert_eq!(get(&mut s, json), (200, "\"ami-12345678\"".into()));
        assert_eq!(get(&mut s, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n").0, 501);
        assert_eq!(get(&mut s, "GET /nothing HTTP/1.1\r\n\r\n"), (404, "Resource not found: /nothing.".into()));
        assert_eq!(get(&mut s, "POST / HTTP/1.1\r\n\r\n").0, 405);
        assert!(respond(&mut s, b"GET / HTTP/1.1\r\n", Instant::now()).is_none(), "not whole yet");
    }

    #[test]
    fn version_2_wants_a_live_token() {
        let mut s = store();
        s.version = Version::V2;
        let path = "GET /latest/meta-data/ami-id HTTP/1.1\r\n";
        assert_eq!(get(&mut s, &format!("{path}\r\n")).0, 401);
        assert_eq!(get(&mut s, &format!("{path}X-metadata-token: forged\r\n\r\n")).0, 401);
        assert_eq!(get(&mut s, "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n").0, 400);
        let forwarded =
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        assert_eq!(get(&mut s, forwarded).0, 400);
        let (status, token) = get(&mut s, "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n");
        assert_eq!((status, token.len()), (200, 48));
        assert_eq!(get(&mut s, &format!("{path}X-metadata-token: {token}\r\n\r\n")), (200, "ami-12345678".into()));
        let later = Instant::now() + Duration::from_secs(6);
        let answer = respond(&mut s, format!("{path}X-metadata-token: {token}\r\n\r\n").as_bytes(), later).unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 401"), "an expired token");
    }

    #[test]
    fn patches_merge_and_the_limit_holds() {
        let mut s = store();
        s.patch(&serde_json::json!({"latest": {"meta-data": {"ami-id": null, "new": "x"}}})).unwrap();
        assert_eq!(s.data()["latest"]["meta-data"], serde_json::json!({"network": {}, "n": 1, "new": "x"}));
        s.set_limit(64);
        let err = s.put(serde_json::json!({"big": "x".repeat(100)})).unwrap_err();
        assert!(err.contains("more than its limit of 64"), "{err}");
        assert_eq!(s.data()["latest"]["meta-data"]["new"], "x", "a refused put changes nothing");
        for not_an_object in [serde_json::json!([null, null]), serde_json::json!(null), serde_json::json!("x")] {
            assert!(s.put(not_an_object.clone()).unwrap_err().starts_with("the body must be a JSON object, not "));
            assert!(s.patch(&not_an_object).unwrap_err().starts_with("the body must be a JSON object, not "));
        }
        assert_eq!(s.data()["latest"]["meta-data"]["new"], "x", "a refused patch changes nothing");
    }

    #[test]
    fn tokens_are_bounded() {
        let mut s = Store::default();
        let now = Instant::now();
        for _ in 0..MAX_TOKENS + 10 {
            s.new_token(Duration::from_secs(60), now);
        }
        assert_eq!(s.tokens.len(), MAX_TOKENS);
    }
}
