//! Frames: what a record's plaintext carries, and their encoding. Pure: bytes in,
//! typed frames out, and back.
//!
//! Ordered frames (OPEN, DATA, FIN) carry a per-stream, per-direction sequence number;
//! the far end delivers them in that order whichever pool connection they came on.
//! Control frames (WINDOW, SESSION_WINDOW, RST, ACK) are idempotent: windows are
//! absolute limits, so a duplicate or a stale one changes nothing.

use bytes::{Buf, BufMut, Bytes};

use crate::error::{Result, TunnelError};
use crate::limits::{FRAME_PAYLOAD_BYTES_MAX, STREAM_CHUNK_BYTES_MAX, TARGET_BYTES_MAX};

const T_DATA: u8 = 1;
const T_OPEN: u8 = 2;
const T_FIN: u8 = 3;
const T_RST: u8 = 4;
const T_WINDOW: u8 = 5;
const T_SESSION_WINDOW: u8 = 6;
const T_ACK: u8 = 7;

/// DATA flag: the payload is a zstd frame of `raw_len` bytes.
pub const FLAG_COMPRESSED: u8 = 1;

/// Compression policy of a stream, chosen per forward and carried in OPEN so the far
/// end compresses its direction the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressPolicy {
    /// Never compress (secrets next to attacker-chosen bytes: CRIME, VORACLE).
    Never,
    /// Compress chunks that shrink; back off on incompressible data.
    #[default]
    Auto,
}

impl CompressPolicy {
    fn code(self) -> u8 {
        match self {
            CompressPolicy::Never => 0,
            CompressPolicy::Auto => 1,
        }
    }

    fn from_code(c: u8) -> Result<CompressPolicy> {
        match c {
            0 => Ok(CompressPolicy::Never),
            1 => Ok(CompressPolicy::Auto),
            _ => Err(TunnelError::malformed("OPEN", format!("policy {c}"))),
        }
    }
}

impl std::str::FromStr for CompressPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "never" | "off" => Ok(CompressPolicy::Never),
            "auto" | "on" => Ok(CompressPolicy::Auto),
            _ => Err(format!("compression policy {s:?}: expected auto or never")),
        }
    }
}

/// Why a stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetCode {
    /// The application closed abruptly, or an error on our side.
    Cancel = 0,
    /// The target could not be reached.
    Unreachable = 1,
    /// Too many streams.
    Refused = 2,
    /// The session is ending.
    Session = 3,
}

impl ResetCode {
    fn from_code(c: u8) -> ResetCode {
        match c {
            1 => ResetCode::Unreachable,
            2 => ResetCode::Refused,
            3 => ResetCode::Session,
            _ => ResetCode::Cancel,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Open {
        stream: u32,
        seq: u64,
        policy: CompressPolicy,
        /// The opener's receive window for this stream (a WINDOW frame could overtake
        /// the OPEN on another connection and find no stream yet).
        window: u64,
        target: Bytes,
    },
    Data {
        stream: u32,
        seq: u64,
        flags: u8,
        /// Carried (uncompressed) bytes: what flow control counts.
        raw_len: u32,
        payload: Bytes,
    },
    Fin {
        stream: u32,
        seq: u64,
    },
    Rst {
        stream: u32,
        code: ResetCode,
    },
    /// The sender may send the stream's carried bytes up to this absolute offset.
    Window {
        stream: u32,
        limit: u64,
    },
    /// The sender may send carried bytes of all streams up to this absolute total.
    SessionWindow {
        limit: u64,
    },
    /// This many records have been received on the connection this frame travels on.
    Ack {
        records: u64,
    },
}

impl Frame {
    /// The stream and sequence number of an ordered frame.
    pub fn ordered(&self) -> Option<(u32, u64)> {
        match *self {
            Frame::Open { stream, seq, .. }
            | Frame::Data { stream, seq, .. }
            | Frame::Fin { stream, seq } => Some((stream, seq)),
            _ => None,
        }
    }

    /// Bytes this frame takes when encoded.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Open { target, .. } => 1 + 4 + 8 + 1 + 8 + 2 + target.len(),
            Frame::Data { payload, .. } => crate::limits::DATA_HEADER_BYTES + payload.len(),
            Frame::Fin { .. } => 1 + 4 + 8,
            Frame::Rst { .. } => 1 + 4 + 1,
            Frame::Window { .. } => 1 + 4 + 8,
            Frame::SessionWindow { .. } | Frame::Ack { .. } => 1 + 8,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Open {
                stream,
                seq,
                policy,
                window,
                target,
            } => {
                assert!(target.len() <= TARGET_BYTES_MAX);
                out.put_u8(T_OPEN);
                out.put_u32(*stream);
                out.put_u64(*seq);
                out.put_u8(policy.code());
                out.put_u64(*window);
                out.put_u16(target.len() as u16);
                out.extend_from_slice(target);
            }
            Frame::Data {
                stream,
                seq,
                flags,
                raw_len,
                payload,
            } => {
                assert!(payload.len() <= FRAME_PAYLOAD_BYTES_MAX);
                out.put_u8(T_DATA);
                out.put_u32(*stream);
                out.put_u64(*seq);
                out.put_u8(*flags);
                out.put_u32(*raw_len);
                out.put_u32(payload.len() as u32);
                out.extend_from_slice(payload);
            }
            Frame::Fin { stream, seq } => {
                out.put_u8(T_FIN);
                out.put_u32(*stream);
                out.put_u64(*seq);
            }
            Frame::Rst { stream, code } => {
                out.put_u8(T_RST);
                out.put_u32(*stream);
                out.put_u8(*code as u8);
            }
            Frame::Window { stream, limit } => {
                out.put_u8(T_WINDOW);
                out.put_u32(*stream);
                out.put_u64(*limit);
            }
            Frame::SessionWindow { limit } => {
                out.put_u8(T_SESSION_WINDOW);
                out.put_u64(*limit);
            }
            Frame::Ack { records } => {
                out.put_u8(T_ACK);
                out.put_u64(*records);
            }
        }
    }
}

fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<()> {
    if buf.remaining() < n {
        return Err(TunnelError::malformed(what, "truncated"));
    }
    Ok(())
}

/// Decodes every frame of a record's content. Payloads share `content`'s memory.
pub fn decode_all(mut content: Bytes, out: &mut Vec<Frame>) -> Result<()> {
    while content.has_remaining() {
        out.push(decode_one(&mut content)?);
    }
    Ok(())
}

fn decode_one(b: &mut Bytes) -> Result<Frame> {
    let t = b.get_u8();
    Ok(match t {
        T_OPEN => {
            need(b, 4 + 8 + 1 + 8 + 2, "OPEN")?;
            let stream = b.get_u32();
            let seq = b.get_u64();
            let policy = CompressPolicy::from_code(b.get_u8())?;
            let window = b.get_u64();
            let len = b.get_u16() as usize;
            if len > TARGET_BYTES_MAX {
                return Err(TunnelError::TooLong {
                    what: "target",
                    len,
                    max: TARGET_BYTES_MAX,
                });
            }
            need(b, len, "OPEN")?;
            Frame::Open {
                stream,
                seq,
                policy,
                window,
                target: b.split_to(len),
            }
        }
        T_DATA => {
            need(b, 4 + 8 + 1 + 4 + 4, "DATA")?;
            let stream = b.get_u32();
            let seq = b.get_u64();
            let flags = b.get_u8();
            let raw_len = b.get_u32();
            let len = b.get_u32() as usize;
            // Checked before anything is allocated or sliced: both lengths come from
            // the peer.
            if len > FRAME_PAYLOAD_BYTES_MAX {
                return Err(TunnelError::TooLong {
                    what: "DATA payload",
                    len,
                    max: FRAME_PAYLOAD_BYTES_MAX,
                });
            }
            if raw_len as usize > STREAM_CHUNK_BYTES_MAX {
                return Err(TunnelError::TooLong {
                    what: "DATA raw length",
                    len: raw_len as usize,
                    max: STREAM_CHUNK_BYTES_MAX,
                });
            }
            if flags & !FLAG_COMPRESSED != 0 {
                return Err(TunnelError::malformed("DATA", format!("flags {flags:#x}")));
            }
            if flags & FLAG_COMPRESSED == 0 && raw_len as usize != len {
                return Err(TunnelError::malformed("DATA", "raw length differs"));
            }
            need(b, len, "DATA")?;
            Frame::Data {
                stream,
                seq,
                flags,
                raw_len,
                payload: b.split_to(len),
            }
        }
        T_FIN => {
            need(b, 12, "FIN")?;
            Frame::Fin {
                stream: b.get_u32(),
                seq: b.get_u64(),
            }
        }
        T_RST => {
            need(b, 5, "RST")?;
            Frame::Rst {
                stream: b.get_u32(),
                code: ResetCode::from_code(b.get_u8()),
            }
        }
        T_WINDOW => {
            need(b, 12, "WINDOW")?;
            Frame::Window {
                stream: b.get_u32(),
                limit: b.get_u64(),
            }
        }
        T_SESSION_WINDOW => {
            need(b, 8, "SESSION_WINDOW")?;
            Frame::SessionWindow { limit: b.get_u64() }
        }
        T_ACK => {
            need(b, 8, "ACK")?;
            Frame::Ack {
                records: b.get_u64(),
            }
        }
        other => return Err(TunnelError::malformed("frame", format!("type {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(stream, seq, t)| Frame::Open {
                    stream,
                    seq,
                    policy: CompressPolicy::Auto,
                    window: seq ^ 5,
                    target: t.into()
                }),
            (
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..2000)
            )
                .prop_map(|(stream, seq, p)| Frame::Data {
                    stream,
                    seq,
                    flags: 0,
                    raw_len: p.len() as u32,
                    payload: p.into()
                }),
            (any::<u32>(), any::<u64>()).prop_map(|(stream, seq)| Frame::Fin { stream, seq }),
            any::<u32>().prop_map(|stream| Frame::Rst {
                stream,
                code: ResetCode::Unreachable
            }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(stream, limit)| Frame::Window { stream, limit }),
            any::<u64>().prop_map(|limit| Frame::SessionWindow { limit }),
            any::<u64>().prop_map(|records| Frame::Ack { records }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(frame(), 0..20)) {
            let mut buf = Vec::new();
            for f in &frames {
                let before = buf.len();
                f.encode(&mut buf);
                prop_assert_eq!(buf.len() - before, f.encoded_len());
            }
            let mut back = Vec::new();
            decode_all(Bytes::from(buf), &mut back).unwrap();
            prop_assert_eq!(back, frames);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut out = Vec::new();
            let _ = decode_all(Bytes::from(bytes), &mut out);
        }
    }
}
