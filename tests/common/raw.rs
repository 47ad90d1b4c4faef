//! The NATS client protocol spoken by hand over TCP, for sending what no client library
//! would: header blocks with bare CRs, invalid UTF-8, missing colons, and so on. Blocking;
//! run it on a blocking thread.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::WAIT;

/// A message as the server delivered it, bytes untouched.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub subject: Vec<u8>,
    pub sid: u64,
    pub header: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl RawMessage {
    /// The micro-service error code in the header block, if any.
    pub fn error_code(&self) -> Option<u16> {
        let header = String::from_utf8_lossy(self.header.as_ref()?).into_owned();
        header.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name == "Nats-Service-Error-Code").then(|| value.trim().parse().ok())?
        })
    }
}

/// One raw connection to a nats-server.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Messages read while waiting for something else (a PONG).
    pub received: Vec<RawMessage>,
}

impl RawClient {
    /// Connects (headers on, no echo of its own messages) and waits for the server's PONG.
    pub fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
            received: Vec::new(),
        };
        client.send(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\
              \"no_responders\":false,\"echo\":false,\"protocol\":1}\r\n",
        );
        client.ping();
        client
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn subscribe(&mut self, subject: &str, sid: u64) {
        self.send(format!("SUB {subject} {sid}\r\n").as_bytes());
    }

    /// `HPUB subject [reply] <header len> <total len>` with exactly these bytes.
    pub fn hpub(&mut self, subject: &[u8], reply: Option<&[u8]>, header: &[u8], payload: &[u8]) {
        let mut frame = b"HPUB ".to_vec();
        frame.extend_from_slice(subject);
        if let Some(reply) = reply {
            frame.push(b' ');
            frame.extend_from_slice(reply);
        }
        frame.extend_from_slice(
            format!(" {} {}\r\n", header.len(), header.len() + payload.len()).as_bytes(),
        );
        frame.extend_from_slice(header);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame);
    }

    /// `PUB subject [reply] <len>` with exactly these bytes.
    pub fn publish(&mut self, subject: &[u8], reply: Option<&[u8]>, payload: &[u8]) {
        let mut frame = b"PUB ".to_vec();
        frame.extend_from_slice(subject);
        if let Some(reply) = reply {
            frame.push(b' ');
            frame.extend_from_slice(reply);
        }
        frame.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame);
    }

    /// Sends PING and reads until the PONG: the server has processed everything sent before.
    /// Messages read meanwhile are kept in `received`. Panics on `-ERR`.
    pub fn ping(&mut self) {
        self.send(b"PING\r\n");
        let start = Instant::now();
        loop {
            while let Some(op) = self.parse() {
                match op {
                    Op::Pong => return,
                    Op::Message(message) => self.received.push(message),
                    Op::Other => {}
                }
            }
            assert!(start.elapsed() < WAIT, "no PONG from the server");
            self.fill();
        }
    }

    /// Reads messages until `enough` says so about all received so far, or [`WAIT`] passes.
    pub fn read_until(&mut self, mut enough: impl FnMut(&[RawMessage]) -> bool) {
        let start = Instant::now();
        while !enough(&self.received) && start.elapsed() < WAIT {
            while let Some(op) = self.parse() {
                if let Op::Message(message) = op {
                    self.received.push(message);
                }
            }
            if enough(&self.received) {
                return;
            }
            self.fill();
        }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("the server closed the raw connection"),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("raw connection failed: {e}"),
        }
    }

    /// One whole operation from the buffer, if it holds one.
    fn parse(&mut self) -> Option<Op> {
        let end = self.buf.windows(2).position(|w| w == b"\r\n")?;
        let line = self.buf[..end].to_vec();
        let args: Vec<&[u8]> = line
            .split(|b| *b == b' ')
            .filter(|a| !a.is_empty())
            .collect();
        let number = |a: &[u8]| -> usize { std::str::from_utf8(a).unwrap().parse().unwrap() };
        let op = match args.first().copied() {
            Some(b"PING") => {
                self.buf.drain(..end + 2);
                self.send(b"PONG\r\n");
                return Some(Op::Other);
            }
            Some(b"PONG") => {
                self.buf.drain(..end + 2);
                return Some(Op::Pong);
            }
            Some(b"-ERR") => panic!("server error: {}", String::from_utf8_lossy(&line)),
            Some(b"MSG") => {
                let len = number(args[args.len() - 1]);
                (0, len)
            }
            Some(b"HMSG") => {
                let total = number(args[args.len() - 1]);
                let header = number(args[args.len() - 2]);
                (header, total)
            }
            _ => {
                self.buf.drain(..end + 2);
                return Some(Op::Other);
            }
        };
        let (header_len, total) = op;
        if self.buf.len() < end + 2 + total + 2 {
            return None;
        }
        let body: Vec<u8> = self.buf[end + 2..end + 2 + total].to_vec();
        self.buf.drain(..end + 2 + total + 2);
        let is_hmsg = args[0] == b"HMSG";
        Some(Op::Message(RawMessage {
            subject: args[1].to_vec(),
            sid: number(args[2]) as u64,
            header: is_hmsg.then(|| body[..header_len].to_vec()),
            payload: body[header_len..].to_vec(),
        }))
    }
}

enum Op {
    Pong,
    Message(RawMessage),
    Other,
}

/// The body of `GET path` from a local HTTP server (nats-server's monitoring).
pub fn http_get(port: u16, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response")
        + 4;
    response.split_off(start)
}
