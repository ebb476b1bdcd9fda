//! The channel: a Noise NNpsk0 handshake over TCP, then messages of up to
//! [`MESSAGE_BYTES_MAX`] carried in Noise transport frames (`u16` length, then the
//! sealed frame). Both sides prove knowledge of the pre-shared key in the handshake; a
//! peer without it fails there and learns nothing. Every later frame is authenticated
//! and numbered by Noise, so a frame changed, dropped, replayed or reordered on the
//! way ends the connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::{Error, Key, Result};

const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// A Noise message's largest size, and the tag it carries.
const FRAME_BYTES_MAX: usize = 65535;
const TAG_BYTES: usize = 16;
const PAYLOAD_BYTES_MAX: usize = FRAME_BYTES_MAX - TAG_BYTES;
/// The largest message either side accepts: a 1 MiB write and its header.
pub const MESSAGE_BYTES_MAX: usize = (1 << 20) + 4096;
/// Tells a backup server from anything else in the first handshake payload.
const PROLOGUE: &[u8] = b"portswitch-vault-remote/1";

fn noise_err(e: snow::Error) -> Error {
    Error::Handshake(e.to_string())
}

fn read_frame(s: &mut TcpStream, buf: &mut [u8; FRAME_BYTES_MAX]) -> Result<usize> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let n = u16::from_be_bytes(len) as usize;
    s.read_exact(&mut buf[..n])?;
    Ok(n)
}

/// Reads exactly `buf.len()` bytes before `deadline` (each read gets only the time
/// left, so a peer trickling bytes cannot stretch it).
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The handshake's first message: an ephemeral key and an empty payload's tag.
const HELLO_BYTES: usize = 32 + TAG_BYTES;

fn write_frame(s: &mut TcpStream, frame: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(2 + frame.len());
    out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    out.extend_from_slice(frame);
    s.write_all(&out)?;
    Ok(())
}

/// An established channel.
pub struct Channel {
    stream: TcpStream,
    noise: snow::TransportState,
    frame: Box<[u8; FRAME_BYTES_MAX]>,
    plain: Box<[u8; FRAME_BYTES_MAX]>,
}

impl Channel {
    /// The initiator's side (the vault shipping a backup).
    pub fn connect(mut stream: TcpStream, key: &Key) -> Result<Channel> {
        let mut hs = snow::Builder::new(NOISE.parse().map_err(noise_err)?)
            .prologue(PROLOGUE)
            .psk(0, &key.0)
            .build_initiator()
            .map_err(noise_err)?;
        let mut frame = Box::new([0u8; FRAME_BYTES_MAX]);
        let n = hs.write_message(&[], &mut frame[..]).map_err(noise_err)?;
        write_frame(&mut stream, &frame[..n])?;
        // A server that does not hold the key closes without a word.
        let n = read_frame(&mut stream, &mut frame).map_err(|e| {
            Error::Handshake(format!(
                "no answer ({e}): a wrong key, or not a backup server"
            ))
        })?;
        let mut plain = Box::new([0u8; FRAME_BYTES_MAX]);
        hs.read_message(&frame[..n], &mut plain[..])
            .map_err(|_| Error::Handshake("the server does not hold this key".into()))?;
        Ok(Channel {
            stream,
            noise: hs.into_transport_mode().map_err(noise_err)?,
            frame,
            plain,
        })
    }

    /// The responder's side (the backup server): the client's first message must be
    /// exactly the handshake's size and arrive whole within `timeout`.
    pub fn accept(mut stream: TcpStream, key: &Key, timeout: Duration) -> Result<Channel> {
        let deadline = Instant::now() + timeout;
        let mut hs = snow::Builder::new(NOISE.parse().map_err(noise_err)?)
            .prologue(PROLOGUE)
            .psk(0, &key.0)
            .build_responder()
            .map_err(noise_err)?;
        let mut frame = Box::new([0u8; FRAME_BYTES_MAX]);
        let mut plain = Box::new([0u8; FRAME_BYTES_MAX]);
        let mut len = [0u8; 2];
        read_exact_by(&mut stream, &mut len, deadline)?;
        let n = u16::from_be_bytes(len) as usize;
        if n != HELLO_BYTES {
            return Err(Error::Handshake(format!(
                "a first message of {n} bytes, not {HELLO_BYTES}"
            )));
        }
        read_exact_by(&mut stream, &mut frame[..n], deadline)?;
        hs.read_message(&frame[..n], &mut plain[..])
            .map_err(|_| Error::Handshake("the client does not hold this key".into()))?;
        let n = hs.write_message(&[], &mut frame[..]).map_err(noise_err)?;
        write_frame(&mut stream, &frame[..n])?;
        Ok(Channel {
            stream,
            noise: hs.into_transport_mode().map_err(noise_err)?,
            frame,
            plain,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends one message (`u32` length, then the body, over as many frames as needed).
    pub fn send(&mut self, body: &[u8]) -> Result<()> {
        if body.len() > MESSAGE_BYTES_MAX {
            return Err(Error::TooLarge(body.len()));
        }
        let mut msg = Vec::with_capacity(4 + body.len());
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes());
        msg.extend_from_slice(body);
        let mut out = Vec::with_capacity(msg.len() + msg.len() / PAYLOAD_BYTES_MAX * 18 + 18);
        for chunk in msg.chunks(PAYLOAD_BYTES_MAX) {
            let n = self
                .noise
                .write_message(chunk, &mut self.frame[..])
                .map_err(noise_err)?;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&self.frame[..n]);
        }
        self.stream.write_all(&out)?;
        Ok(())
    }

    /// Receives one message; a frame that does not open ends the channel.
    pub fn recv(&mut self) -> Result<Vec<u8>> {
        let mut body: Vec<u8> = Vec::new();
        let mut want: Option<usize> = None;
        loop {
            let n = read_frame(&mut self.stream, &mut self.frame)?;
            let p = self
                .noise
                .read_message(&self.frame[..n], &mut self.plain[..])
                .map_err(|_| Error::Tampered)?;
            let mut chunk = &self.plain[..p];
            if want.is_none() {
                if chunk.len() < 4 {
                    return Err(Error::Protocol("short message"));
                }
                let len = u32::from_be_bytes(chunk[..4].try_into().expect("4 bytes")) as usize;
                if len > MESSAGE_BYTES_MAX {
                    return Err(Error::TooLarge(len));
                }
                want = Some(len);
                body.reserve(len);
                chunk = &chunk[4..];
            }
            let len = want.expect("set above");
            if body.len() + chunk.len() > len {
                return Err(Error::Protocol("message longer than announced"));
            }
            body.extend_from_slice(chunk);
            if body.len() == len {
                return Ok(body);
            }
        }
    }
}
