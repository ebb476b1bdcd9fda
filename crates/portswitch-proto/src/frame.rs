//! Frames: `body_len: u32` then `body_len` bytes holding one or more messages.
//!
//! Reading: [`frame_len`] says whether a buffer starts with a whole frame (and rejects an
//! oversized one from its header alone, before anything is buffered for it), and
//! [`messages`] walks the messages of a body. Writing: [`FrameBuf`] appends messages,
//! opening a new frame whenever the current one would exceed its byte or message limit,
//! so a writer can coalesce everything pending into as few frames as possible.

use bytes::{BufMut, BytesMut};

use crate::limits::{FRAME_HEADER_BYTES, MESSAGE_HEADER_BYTES};
use crate::msg::{Event, Reply, Request};

/// Structural errors: the stream can no longer be trusted, so the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("message header or body runs past the end of its frame")]
    Overrun,
    #[error("more than {max} messages in one frame")]
    TooManyMessages { max: usize },
}

/// If `buf` starts with a complete frame, its total length (header included).
/// `Ok(None)` means more bytes are needed. The declared length is checked against
/// `frame_bytes_max` from the header alone.
pub fn frame_len(buf: &[u8], frame_bytes_max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let total = FRAME_HEADER_BYTES + len;
    Ok((buf.len() >= total).then_some(total))
}

/// One message as framed: opcode, request id and raw body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMessage<'a> {
    pub opcode: u8,
    pub id: u32,
    pub body: &'a [u8],
}

/// Iterates the messages of a frame body, at most `messages_max` of them.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
    left: usize,
    max: usize,
}

/// Walks the messages of a frame body (the bytes after the frame header).
pub fn messages(body: &[u8], messages_max: usize) -> Messages<'_> {
    Messages {
        rest: body,
        left: messages_max,
        max: messages_max,
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<RawMessage<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.left == 0 {
            self.rest = &[];
            return Some(Err(FrameError::TooManyMessages { max: self.max }));
        }
        self.left -= 1;
        if self.rest.len() < MESSAGE_HEADER_BYTES {
            self.rest = &[];
            return Some(Err(FrameError::Overrun));
        }
        let r = self.rest;
        let opcode = r[0];
        let id = u32::from_be_bytes([r[1], r[2], r[3], r[4]]);
        let len = u32::from_be_bytes([r[5], r[6], r[7], r[8]]) as usize;
        let end = MESSAGE_HEADER_BYTES.checked_add(len)?;
        if r.len() < end {
            self.rest = &[];
            return Some(Err(FrameError::Overrun));
        }
        self.rest = &r[end..];
        Some(Ok(RawMessage {
            opcode,
            id,
            body: &r[MESSAGE_HEADER_BYTES..end],
        }))
    }
}

/// An output buffer of whole frames, built message by message.
#[derive(Debug)]
pub struct FrameBuf {
    buf: BytesMut,
    /// Offset of the open frame's header, if a frame is open.
    open: Option<usize>,
    open_messages: usize,
    frame_bytes_max: usize,
    messages_max: usize,
}

impl FrameBuf {
    /// A buffer whose frames hold at most `frame_bytes_max` body bytes and
    /// `messages_max` messages.
    pub fn new(frame_bytes_max: usize, messages_max: usize) -> Self {
        assert!(messages_max > 0);
        FrameBuf {
            buf: BytesMut::new(),
            open: None,
            open_messages: 0,
            frame_bytes_max,
            messages_max,
        }
    }

    /// Frames begun from now on hold at most `frame_bytes_max` body bytes (the open
    /// frame is closed if it already holds more).
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: usize) {
        if let Some(start) = self.open {
            if self.buf.len() - start - FRAME_HEADER_BYTES > frame_bytes_max {
                self.close();
            }
        }
        self.frame_bytes_max = frame_bytes_max;
    }

    /// Bytes buffered (whole frames plus the open one).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Drops everything buffered.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.open = None;
        self.open_messages = 0;
    }

    fn begin(&mut self, opcode: u8, id: u32, body_len: usize) {
        let need = MESSAGE_HEADER_BYTES + body_len;
        // Callers check lengths against the protocol's limits first; a message that
        // cannot fit any frame would be a bug in that check.
        assert!(
            need <= crate::limits::FRAME_BYTES_MAX,
            "message of {need} bytes cannot fit a frame"
        );
        if let Some(start) = self.open {
            let used = self.buf.len() - start - 4;
            if used + need > self.frame_bytes_max || self.open_messages >= self.messages_max {
                self.close();
            }
        }
        // (A message larger than this buffer's frames — a small pre-login cap — gets a
        // frame of its own; the peer then says plainly that it is too large.)
        if self.open.is_none() {
            self.open = Some(self.buf.len());
            self.open_messages = 0;
            self.buf.put_u32(0);
        }
        self.open_messages += 1;
        self.buf.reserve(need);
        self.buf.put_u8(opcode);
        self.buf.put_u32(id);
        self.buf.put_u32(body_len as u32);
    }

    fn close(&mut self) {
        if let Some(start) = self.open.take() {
            let len = (self.buf.len() - start - 4) as u32;
            self.buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Appends a request with request id `id` (non-zero).
    pub fn push_request(&mut self, id: u32, req: &Request<'_>) {
        assert!(id != 0, "request id 0 is reserved for events");
        self.begin(req.opcode(), id, req.body_len());
        let before = self.buf.len();
        req.encode_body(&mut self.buf);
        debug_assert_eq!(self.buf.len() - before, req.body_len());
    }

    /// Appends a reply to request `id`.
    pub fn push_reply(&mut self, id: u32, reply: &Reply<'_>) {
        self.begin(reply.opcode(), id, reply.body_len());
        let before = self.buf.len();
        reply.encode_body(&mut self.buf);
        debug_assert_eq!(self.buf.len() - before, reply.body_len());
    }

    /// Appends an event.
    pub fn push_event(&mut self, event: &Event<'_>) {
        self.begin(event.opcode(), 0, event.body_len());
        let before = self.buf.len();
        event.encode_body(&mut self.buf);
        debug_assert_eq!(self.buf.len() - before, event.body_len());
    }

    /// Appends a CHANNEL switch: the messages after it belong to `channel`.
    pub fn push_channel(&mut self, channel: u16) {
        self.begin(crate::msg::op::CHANNEL, channel as u32, 0);
    }

    /// Appends whole, already encoded frames (copied as they are).
    pub fn push_frames(&mut self, frames: &[u8]) {
        self.close();
        self.buf.extend_from_slice(frames);
    }

    /// Closes the open frame and swaps the bytes out into `out` (which should be empty;
    /// its allocation is kept for reuse), leaving this buffer empty.
    pub fn take_into(&mut self, out: &mut BytesMut) {
        self.close();
        out.clear();
        std::mem::swap(&mut self.buf, out);
        self.open_messages = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::ErrorCode;
    use crate::limits::*;
    use crate::msg::*;

    fn frames(bytes: &[u8], max: usize) -> Vec<Vec<(u8, u32, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = frame_len(rest, max).unwrap().expect("whole frame");
            let msgs = messages(&rest[4..n], usize::MAX)
                .map(|m| m.map(|m| (m.opcode, m.id, m.body.to_vec())).unwrap())
                .collect();
            out.push(msgs);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn coalesces_and_splits_by_bytes_and_count() {
        let mut fb = FrameBuf::new(64, 3);
        for i in 1..=7u32 {
            fb.push_request(
                i,
                &Request::Query {
                    port: b"abcdefghij",
                },
            );
        }
        let mut out = BytesMut::new();
        fb.take_into(&mut out);
        let fs = frames(&out, 64);
        // 9 + 12 = 21 bytes per message: three fit by bytes (63) and by count.
        assert_eq!(
            fs.iter().map(|f| f.len()).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let ids: Vec<u32> = fs.iter().flatten().map(|m| m.1).collect();
        assert_eq!(ids, (1..=7).collect::<Vec<_>>());
        assert!(fb.is_empty());
    }

    #[test]
    fn oversized_header_is_rejected_before_buffering() {
        let hdr = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert_eq!(
            frame_len(&hdr, FRAME_BYTES_MAX),
            Err(FrameError::TooLarge {
                len: FRAME_BYTES_MAX + 1,
                max: FRAME_BYTES_MAX
            })
        );
        assert_eq!(frame_len(&[0, 0, 0, 0], 10), Err(FrameError::Empty));
        assert_eq!(frame_len(&[0, 0, 0, 5, 1], 10), Ok(None));
    }

    #[test]
    fn overrun_and_count_limits() {
        // A message claiming 100 body bytes in a 12-byte body.
        let body = [op::PING, 0, 0, 0, 1, 0, 0, 0, 100, 1, 2, 3];
        assert_eq!(messages(&body, 10).next(), Some(Err(FrameError::Overrun)));
        let mut fb = FrameBuf::new(1 << 10, 100);
        for i in 1..=3 {
            fb.push_request(i, &Request::Ping);
        }
        let mut out = BytesMut::new();
        fb.take_into(&mut out);
        let mut it = messages(&out[4..], 2);
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_ok());
        assert_eq!(it.next(), Some(Err(FrameError::TooManyMessages { max: 2 })));
    }

    #[test]
    fn unknown_opcode_and_long_fields_are_body_errors() {
        assert_eq!(
            Request::decode(0x7F, &[]).unwrap_err().code,
            ErrorCode::UnknownCommand
        );
        let mut b = BytesMut::new();
        b.put_u16(300);
        b.extend_from_slice(&[b'x'; 300]);
        assert_eq!(
            Request::decode(op::QUERY, &b).unwrap_err().code,
            ErrorCode::NameTooLong
        );
        assert_eq!(
            Request::decode(op::QUERY, &[0]).unwrap_err().code,
            ErrorCode::Malformed
        );
        assert_eq!(
            Request::decode(op::REGISTER, &[0x80, 0, 1, b'a', 0, 0])
                .unwrap_err()
                .code,
            ErrorCode::InvalidArgument
        );
    }
}
