//! Connection output: each connection's queued frames, the channel a session is on
//! (ids the core sees), and `Out`, which turns the core's effects into queued bytes.

use super::*;

/// One connection's output side as the shared state sees it.
pub(crate) struct ConnOut {
    pub(super) id: ConnId,
    /// The peer's address (lockout, audit, loopback-only bootstrap).
    pub(super) addr: std::net::IpAddr,
    /// TLS facts: channel binding, client-certificate user.
    pub(super) security: crate::tls::ConnSecurity,
    pub(super) out: FrameBuf,
    pub(crate) notify: Arc<Notify>,
    /// Close once `out` is written (set by GOAWAY paths).
    pub(crate) closing: bool,
    pub(super) dirty: bool,
    /// The channel the client's messages currently belong to (CHANNEL switches).
    pub(super) in_channel: u16,
    /// The channel the last switch queued or sent to the client named;
    /// `CHANNEL_UNKNOWN` after queued output was dropped.
    pub(super) out_channel: u32,
    /// Bit set of the channels other than 0 the client has switched to: their
    /// sessions see the disconnect too. Empty (no allocation) for a connection that
    /// never multiplexes.
    pub(super) channels: Vec<u64>,
    /// A HELLO has succeeded on this connection (on any channel). Until then its
    /// frames are capped at `frame_bytes_before_login_max` and it has
    /// `login_timeout_ms` to get there.
    pub(super) logged_in: bool,
}

pub(super) const CHANNEL_UNKNOWN: u32 = u32::MAX;

/// The ids the core sees: a connection's slot in the low 24 bits, the channel in the
/// next 16, a generation (so a reused slot gets new ids) in the top 24. A plain
/// connection is channel 0.
pub(super) const CONN_KEY_BITS: u32 = 24;
pub(super) const CONN_CHANNEL_BITS: u32 = 16;
pub(super) const CONN_CHANNEL_MASK: u64 = ((1 << CONN_CHANNEL_BITS) - 1) << CONN_KEY_BITS;

pub(super) fn conn_key(conn: ConnId) -> usize {
    (conn & ((1 << CONN_KEY_BITS) - 1)) as usize
}

pub(super) fn conn_base(conn: ConnId) -> ConnId {
    conn & !CONN_CHANNEL_MASK
}

pub(super) fn conn_channel(conn: ConnId) -> u16 {
    ((conn & CONN_CHANNEL_MASK) >> CONN_KEY_BITS) as u16
}

pub(super) fn on_channel(conn: ConnId, channel: u16) -> ConnId {
    conn_base(conn) | (channel as u64) << CONN_KEY_BITS
}

impl ConnOut {
    /// Queues a CHANNEL switch unless the client already reads `channel`.
    pub(super) fn select(&mut self, channel: u16) {
        if self.out_channel != channel as u32 {
            self.out.push_channel(channel);
            self.out_channel = channel as u32;
        }
    }

    pub(super) fn mark(&mut self, channel: u16) {
        let (word, bit) = (channel as usize / 64, channel % 64);
        if self.channels.len() <= word {
            self.channels.resize(word + 1, 0);
        }
        self.channels[word] |= 1 << bit;
    }

    /// Every id of this connection a session may be attached to: channel 0 and each
    /// channel switched to.
    pub(super) fn ids(&self) -> Vec<ConnId> {
        let mut ids = vec![self.id];
        for (w, bits) in self.channels.iter().enumerate() {
            let mut bits = *bits;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let ch = (w * 64) as u16 + b as u16;
                if ch != 0 {
                    ids.push(on_channel(self.id, ch));
                }
            }
        }
        ids
    }

    /// Drops queued output (a slow consumer) and queues a connection-wide GOAWAY.
    pub(super) fn replace_with_goaway(&mut self, event: &Event<'_>) {
        self.out.clear();
        if !self.channels.is_empty() {
            self.out_channel = CHANNEL_UNKNOWN;
        }
        self.select(0);
        self.out.push_event(event);
    }
}

/// Adapts the core's effects to connection output buffers.
pub(super) struct Out<'a> {
    pub(super) conns: &'a mut slab::Slab<ConnOut>,
    pub(super) dirty: &'a mut Vec<usize>,
    pub(super) denials: &'a mut Vec<(String, Perm, Vec<u8>)>,
}

impl Out<'_> {
    pub(super) fn slot(&mut self, conn: ConnId) -> Option<&mut ConnOut> {
        let key = conn_key(conn);
        let c = self.conns.get_mut(key)?;
        if c.id != conn_base(conn) || c.closing {
            return None;
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
        c.select(conn_channel(conn));
        Some(c)
    }
}

impl Outbox for Out<'_> {
    fn reply(&mut self, conn: ConnId, id: u32, reply: &Reply<'_>) {
        if let Some(c) = self.slot(conn) {
            c.out.push_reply(id, reply);
        }
    }
    fn event(&mut self, conn: ConnId, event: &Event<'_>) {
        if let Some(c) = self.slot(conn) {
            c.out.push_event(event);
        }
    }
    fn frames(&mut self, conn: ConnId, frames: &[u8]) {
        if let Some(c) = self.slot(conn) {
            c.out.push_frames(frames);
        }
    }
    fn close(&mut self, conn: ConnId) {
        // A session's end on a channel other than 0 (expired, taken over) leaves the
        // connection and its other channels be: the channel may HELLO again.
        if conn_channel(conn) != 0 {
            return;
        }
        if let Some(c) = self.slot(conn) {
            c.closing = true;
        }
    }
    fn denied(&mut self, _conn: ConnId, user: &str, perm: Perm, name: &[u8]) {
        self.denials.push((user.to_string(), perm, name.to_vec()));
    }
}

impl State {
    /// Sends every open connection `GOAWAY code` and closes it once written.
    pub(super) fn goaway_all(&mut self, code: ErrorCode, message: &[u8]) {
        for (_, c) in self.conns.iter_mut() {
            if !c.closing {
                c.select(0);
                c.out.push_event(&Event::GoAway { code, message });
                c.closing = true;
            }
            c.notify.notify_one();
        }
    }

    pub(super) fn goaway(&mut self, conn: ConnId, e: &FrameError) {
        let mut out = Out {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
            denials: &mut self.denials,
        };
        break_with_goaway(&mut out, conn, e);
        self.counters.malformed_total += 1;
    }
}

pub(super) fn break_with_goaway(out: &mut Out<'_>, conn: ConnId, e: &FrameError) {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        FrameError::TooManyMessages { .. } => ErrorCode::TooManyCommands,
        _ => ErrorCode::Malformed,
    };
    let msg = e.to_string();
    out.event(
        conn,
        &Event::GoAway {
            code,
            message: msg.as_bytes(),
        },
    );
    out.close(conn);
}
