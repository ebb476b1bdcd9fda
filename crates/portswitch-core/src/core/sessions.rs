//! Sessions: HELLO (new, resumed, adopted from an earlier master), their leases, how
//! they end, and events delivered to them (or kept while they have no connection).

use super::*;

/// Whether two session secrets are equal, in a time that does not depend on where
/// they differ: `subtle` keeps the optimiser from turning the comparison back into
/// one with an early exit, which a hand-written loop cannot promise.
pub(super) fn constant_time_eq(a: u64, b: u64) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a, &b).into()
}

impl Core {
    /// The longest lease any session of this core holds now (0 without sessions).
    /// A successor's recovery window must cover it; a master lowers its recorded
    /// lease ceiling only once this has stayed below it for a whole ceiling.
    pub fn lease_ms_longest(&self) -> u32 {
        self.leases.keys().next_back().copied().unwrap_or(0)
    }

    pub(super) fn lease_held(&mut self, lease_ms: u32) {
        *self.leases.entry(lease_ms).or_default() += 1;
    }

    pub(super) fn lease_dropped(&mut self, lease_ms: u32) {
        let n = self
            .leases
            .get_mut(&lease_ms)
            .expect("every session's lease is counted");
        *n -= 1;
        if *n == 0 {
            self.leases.remove(&lease_ms);
        }
    }

    /// The user and access of the session on `conn`, if it has a session (`None`s on
    /// a server without authentication).
    pub fn session_user(&self, conn: ConnId) -> Option<(Option<&str>, Option<&Access>)> {
        let slot = *self.conn_sessions.get(&conn)?;
        let s = &self.sessions[slot as usize];
        Some((s.user.as_deref(), s.access.as_deref()))
    }

    /// Ends every session of `user` (the user was deleted): each connection gets
    /// GOAWAY `user_removed`, and the sessions' ports are released as on any end.
    /// Returns how many sessions ended.
    pub fn end_sessions_of(&mut self, user: &str, now_ms: u64, out: &mut impl Outbox) -> usize {
        self.advance(now_ms);
        let slots: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.user.as_deref() == Some(user) && !s.ending)
            .map(|(k, _)| k as u32)
            .collect();
        for &slot in &slots {
            self.end_session(slot, End::UserRemoved, out);
        }
        slots.len()
    }

    /// Releases up to `release_step_ports_max` ports of ended sessions, and forgets the
    /// sessions that have none left.
    pub(super) fn continue_ending(&mut self, out: &mut impl Outbox) {
        let mut budget = self.cfg.release_step_ports_max;
        while let Some(&slot) = self.ending.front() {
            while budget > 0 {
                let Some(&port) = self.sessions[slot as usize].ports.last() else {
                    break;
                };
                self.release(port, out);
                budget -= 1;
            }
            if !self.sessions[slot as usize].ports.is_empty() {
                return;
            }
            self.ending.pop_front();
            self.forget_session(slot);
        }
    }

    pub(super) fn forget_session(&mut self, slot: u32) {
        let s = self.sessions.remove(slot as usize);
        self.session_ids.remove(&s.id);
        self.lease_dropped(s.lease_ms);
    }

    /// A session's resume secret: keyed by the group's secret keys, bound to the id
    /// and the user, so any master of the group can verify it and only that user can
    /// present it.
    pub(super) fn secret_for(&self, id: u64, user: Option<&str>) -> u64 {
        let mut h =
            siphasher::sip::SipHasher24::new_with_keys(self.secret_keys.0, self.secret_keys.1);
        h.write_u64(id);
        match user {
            Some(u) => {
                h.write_u8(1);
                h.write(u.as_bytes());
            }
            None => h.write_u8(0),
        }
        h.finish()
    }

    /// A fresh session id: unpredictable, non-zero, unique among this core's sessions
    /// (and, being keyed by a per-master random key and the epoch, practically unique
    /// across the group's masters).
    pub(super) fn next_session_id(&mut self) -> u64 {
        loop {
            self.session_seq += 1;
            let mut h = siphasher::sip::SipHasher24::new_with_keys(self.id_keys.0, self.id_keys.1);
            h.write_u64(self.epoch);
            h.write_u64(self.session_seq);
            let id = h.finish();
            if id != 0 && !self.session_ids.contains_key(&id) {
                return id;
            }
        }
    }

    /// Handles a HELLO whose credentials the driver has verified: the session (new or
    /// resumed) belongs to `ident.user` and is held to `ident.access`; HELLO_OK carries
    /// `auth_reply` (the SCRAM server-final-message).
    pub fn handle_authenticated_hello(
        &mut self,
        b: &mut Batch,
        id: u32,
        h: &Hello<'_>,
        ident: &Identity,
        auth_reply: &[u8],
        out: &mut impl Outbox,
    ) {
        self.stats.requests_total += 1;
        match self.hello(b, h, Some(ident), out) {
            Ok(Reply::HelloOk(ok)) => {
                out.reply(
                    b.conn,
                    id,
                    &Reply::HelloOk(HelloOk {
                        auth: auth_reply,
                        ..ok
                    }),
                );
                self.flush_missed(b.session, b.conn, out);
            }
            Err(Fail::Code(code, msg)) => self.error(b.conn, id, code, msg, out),
            other => unreachable!("hello returns HELLO_OK or an error, not {other:?}"),
        }
    }

    pub(super) fn hello(
        &mut self,
        b: &mut Batch,
        h: &Hello<'_>,
        ident: Option<&Identity>,
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        if b.session != NONE {
            return Err(Fail::Code(
                ErrorCode::SessionExists,
                "this connection already has a session",
            ));
        }
        if h.version_min > PROTOCOL_VERSION || h.version_max < PROTOCOL_VERSION {
            return Err(Fail::Code(
                ErrorCode::VersionUnsupported,
                "this server speaks protocol version 1",
            ));
        }
        if ident.is_none() && !h.credentials.is_empty() {
            return Err(Fail::Code(
                ErrorCode::AuthUnavailable,
                "this server has no authentication configured",
            ));
        }
        if h.lease_ms < self.cfg.lease_ms_min || h.lease_ms > self.cfg.lease_ms_max {
            return Err(Fail::Code(
                ErrorCode::LeaseOutOfRange,
                "lease_ms outside the server's range",
            ));
        }
        let limits = self.limits();
        let recovery_ms = self.recovery_left_ms().unwrap_or(0).min(u32::MAX as u64) as u32;
        if h.resume_session != 0 && !self.session_ids.contains_key(&h.resume_session) {
            // Not one of ours: in a recovery window, a session of an earlier master
            // whose secret verifies under the group's keys is adopted with its id.
            let user = ident.map(|i| i.user.as_str());
            let secret = self.secret_for(h.resume_session, user);
            if self.recovery_until.is_none() || !constant_time_eq(secret, h.resume_secret) {
                return Err(Fail::Code(
                    ErrorCode::ResumeFailed,
                    "no such session (expired, ended, or wrong secret)",
                ));
            }
            if self.sessions.len() >= self.cfg.sessions_max as usize {
                return Err(Fail::Code(
                    ErrorCode::SessionsMax,
                    "the server holds the most sessions it may",
                ));
            }
            let slot = self.insert_session(h.resume_session, secret, b, h, ident);
            self.sessions[slot as usize].adopted = true;
            self.stats.sessions_adopted_total += 1;
            return Ok(Reply::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                features: 0,
                session: h.resume_session,
                secret,
                epoch: self.epoch,
                lease_ms: h.lease_ms,
                resumed: true,
                limits,
                auth: &[],
                recovery_ms,
                channels_max: self.cfg.channels_per_connection_max,
            }));
        }
        if h.resume_session != 0 {
            let slot = self.session_ids[&h.resume_session];
            // Only the user who owns a session may resume it.
            let user = ident.map(|i| i.user.as_str());
            let ok = self.sessions.get(slot as usize).is_some_and(|s| {
                !s.ending
                    && constant_time_eq(s.secret, h.resume_secret)
                    && s.user.as_deref() == user
            });
            if !ok {
                return Err(Fail::Code(
                    ErrorCode::ResumeFailed,
                    "no such session (expired, ended, or wrong secret)",
                ));
            }
            // A resume takes the session over from a connection it may still have.
            let old = self.sessions[slot as usize].conn.take();
            if let Some(old) = old {
                self.conn_sessions.remove(&old);
                out.event(
                    old,
                    &Event::GoAway {
                        code: ErrorCode::SessionExists,
                        message: b"session resumed on another connection",
                    },
                );
                out.close(old);
            }
            let old_lease = self.sessions[slot as usize].lease_ms;
            if old_lease != h.lease_ms {
                self.lease_dropped(old_lease);
                self.lease_held(h.lease_ms);
            }
            let s = &mut self.sessions[slot as usize];
            s.conn = Some(b.conn);
            s.lease_ms = h.lease_ms;
            s.end_on_disconnect = h.end_on_disconnect;
            s.deadline_ms = b.now_ms + h.lease_ms as u64;
            self.conn_sessions.insert(b.conn, slot);
            b.session = slot;
            self.stats.sessions_resumed_total += 1;
            return Ok(Reply::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                features: 0,
                session: s.id,
                secret: s.secret,
                epoch: self.epoch,
                lease_ms: h.lease_ms,
                resumed: true,
                limits,
                auth: &[],
                recovery_ms,
                channels_max: self.cfg.channels_per_connection_max,
            }));
        }
        if self.sessions.len() >= self.cfg.sessions_max as usize {
            return Err(Fail::Code(
                ErrorCode::SessionsMax,
                "the server holds the most sessions it may",
            ));
        }
        let id = self.next_session_id();
        let secret = self.secret_for(id, ident.map(|i| i.user.as_str()));
        self.insert_session(id, secret, b, h, ident);
        self.stats.sessions_created_total += 1;
        Ok(Reply::HelloOk(HelloOk {
            version: PROTOCOL_VERSION,
            features: 0,
            session: id,
            secret,
            epoch: self.epoch,
            lease_ms: h.lease_ms,
            resumed: false,
            limits,
            auth: &[],
            recovery_ms,
            channels_max: self.cfg.channels_per_connection_max,
        }))
    }

    /// Creates a session attached to the batch's connection.
    pub(super) fn insert_session(
        &mut self,
        id: u64,
        secret: u64,
        b: &mut Batch,
        h: &Hello<'_>,
        ident: Option<&Identity>,
    ) -> u32 {
        let entry = self.sessions.vacant_entry();
        let slot = entry.key() as u32;
        let deadline_ms = b.now_ms + h.lease_ms as u64;
        entry.insert(Session {
            id,
            secret,
            node: h.node_name.into(),
            lease_ms: h.lease_ms,
            deadline_ms,
            conn: Some(b.conn),
            end_on_disconnect: h.end_on_disconnect,
            ports: Vec::new(),
            waits: Vec::new(),
            watches: Vec::new(),
            prefix_watches: 0,
            missed: None,
            user: ident.map(|i| i.user.clone().into_boxed_str()),
            access: ident.map(|i| Box::new(i.access.clone())),
            ending: false,
            adopted: false,
        });
        self.session_ids.insert(id, slot);
        self.lease_held(h.lease_ms);
        self.expiry.push(Reverse((deadline_ms, id)));
        self.conn_sessions.insert(b.conn, slot);
        b.session = slot;
        slot
    }

    pub(super) fn flush_missed(&mut self, slot: u32, conn: ConnId, out: &mut impl Outbox) {
        if slot == NONE {
            return;
        }
        if let Some(mut missed) = self.sessions[slot as usize].missed.take() {
            if missed.overflowed {
                out.event(conn, &Event::Resync);
            } else {
                let mut bytes = BytesMut::new();
                missed.frames.take_into(&mut bytes);
                out.frames(conn, &bytes);
            }
        }
    }

    pub(super) fn end_session(&mut self, slot: u32, why: End, out: &mut impl Outbox) {
        // Leave queues and drop watches first, so releasing this session's ports below
        // neither promotes it nor notifies it.
        let waits = std::mem::take(&mut self.sessions[slot as usize].waits);
        for port in waits {
            if let Some(x) = self.ports.extra(port) {
                if x.queue.iter().any(|w| w.session == slot) {
                    self.ports
                        .extra_mut(port)
                        .queue
                        .retain(|w| w.session != slot);
                    self.stats.waiters -= 1;
                }
            }
            self.ports.remove_if_unused(port);
        }
        let watches = std::mem::take(&mut self.sessions[slot as usize].watches);
        for port in watches {
            self.ports.extra_mut(port).watchers.retain(|&w| w != slot);
            self.stats.watches -= 1;
            self.ports.remove_if_unused(port);
        }
        if self.sessions[slot as usize].prefix_watches > 0 {
            self.drop_prefix_watches(|p| p.session == slot);
        }
        let s = &mut self.sessions[slot as usize];
        s.missed = None;
        if let Some(conn) = s.conn.take() {
            self.conn_sessions.remove(&conn);
            let goaway = match why {
                End::Expired => Some((ErrorCode::SessionExpired, &b"session lease expired"[..])),
                End::UserRemoved => Some((
                    ErrorCode::UserRemoved,
                    &b"the session's user was deleted"[..],
                )),
                End::Bye | End::Disconnected => None,
            };
            if let Some((code, message)) = goaway {
                out.event(conn, &Event::GoAway { code, message });
                out.close(conn);
            }
        }
        // Release the ports now, or — for a session holding more than one step's worth
        // — a step at a time from `handle_timeout`, so that one session's end never
        // holds the server for long (781,250 ports took ~300 ms in one go). Until then
        // its remaining ports read as owned by it; nobody can use or resume it.
        if self.sessions[slot as usize].ports.len() <= self.cfg.release_step_ports_max as usize {
            while let Some(&port) = self.sessions[slot as usize].ports.last() {
                self.release(port, out);
            }
            self.forget_session(slot);
        } else {
            self.sessions[slot as usize].ending = true;
            self.ending.push_back(slot);
        }
    }

    /// Sends an event to a session: to its connection, or into its missed-events
    /// buffer while it has none.
    pub(super) fn deliver(&mut self, slot: u32, event: &Event<'_>, out: &mut impl Outbox) {
        let limit = self.cfg.detached_event_bytes_max as usize;
        let frame_max = self.cfg.frame_bytes_max as usize;
        let commands_max = self.cfg.commands_per_frame_max as usize;
        let s = &mut self.sessions[slot as usize];
        if s.ending {
            return;
        }
        match s.conn {
            Some(conn) => out.event(conn, event),
            None => {
                let m = s.missed.get_or_insert_with(|| {
                    Box::new(Missed {
                        frames: FrameBuf::new(frame_max, commands_max),
                        overflowed: false,
                    })
                });
                if m.overflowed {
                    return;
                }
                if m.frames.len() + limits::MESSAGE_HEADER_BYTES + event.body_len() > limit {
                    m.overflowed = true;
                    m.frames.clear();
                } else {
                    m.frames.push_event(event);
                }
            }
        }
    }
}
