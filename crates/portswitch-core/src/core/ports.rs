//! Ownership: REGISTER, queues of waiters, grants with fencing tokens, UNREGISTER and
//! release, QUERY.

use super::*;

impl Core {
    pub(super) fn next_token(&mut self) -> u64 {
        if self.seq == u32::MAX {
            // 2^32 grants in one epoch: move to the next epoch so tokens keep rising.
            // (A cluster will take the next epoch from consensus instead.)
            self.epoch += 1;
            assert!(self.epoch < (1 << 32) - 1, "epoch space exhausted");
            self.seq = 0;
        }
        self.seq += 1;
        self.epoch << 32 | self.seq as u64
    }

    pub(super) fn check_name(&self, name: &[u8]) -> Result<(), Fail> {
        if name.is_empty() {
            return Err(Fail::Code(ErrorCode::EmptyName, "port name is empty"));
        }
        if name.len() > self.cfg.port_name_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::NameTooLong,
                "port name longer than port_name_bytes_max",
            ));
        }
        Ok(())
    }

    pub(super) fn check_value(&self, value: &[u8]) -> Result<(), Fail> {
        if value.len() > self.cfg.value_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::ValueTooLarge,
                "value larger than value_bytes_max",
            ));
        }
        Ok(())
    }

    /// Grants the free port at `port` to `session` with a new token, telling watchers.
    pub(super) fn grant(
        &mut self,
        port: u32,
        session: u32,
        value: &[u8],
        out: &mut impl Outbox,
    ) -> u64 {
        let token = self.next_token();
        self.grant_with(port, session, value, token, out)
    }

    /// Grants the free port at `port` to `session` with `token`, telling watchers.
    pub(super) fn grant_with(
        &mut self,
        port: u32,
        session: u32,
        value: &[u8],
        token: u64,
        out: &mut impl Outbox,
    ) -> u64 {
        let s = &mut self.sessions[session as usize];
        let pos = s.ports.len() as u32;
        s.ports.push(port);
        let (sid, node_len) = (s.id, s.node.len());
        self.ports.set_owner(port, session, pos, token, value);
        self.stats.grants_total += 1;
        let has_watchers = self
            .ports
            .extra(port)
            .is_some_and(|x| !x.watchers.is_empty());
        if has_watchers || !self.prefix_watches.is_empty() {
            let name: Box<[u8]> = self.ports.get(port).name().into();
            let node: Box<[u8]> = self.sessions[session as usize].node.clone();
            debug_assert_eq!(node.len(), node_len);
            let ev = Event::Claimed {
                port: &name,
                session: sid,
                token,
                node: &node,
            };
            let record = self.filtered_watch_covers(&name).then_some(Record {
                name: &name,
                value,
                session: sid,
                node: &node,
                token,
                event: Some("claimed"),
            });
            self.notify_watchers(port, &name, &ev, record.as_ref(), out);
        }
        token
    }

    /// Releases the owned port at `port`: tells watchers, then hands it to the first
    /// waiter (who gets ACQUIRED), or drops the entry if nothing refers to it.
    pub(super) fn release(&mut self, port: u32, out: &mut impl Outbox) {
        let e = self.ports.get(port);
        let (owner, pos) = (e.owner, e.owner_pos);
        // Remove from the owner's list by swapping the last one into its place.
        let s = &mut self.sessions[owner as usize];
        let last = s.ports.pop().expect("owner lists the port");
        if last != port {
            s.ports[pos as usize] = last;
            self.ports.get_mut(last).owner_pos = pos;
        }
        // What filtered watches see of the port: as it was before the release (taken
        // only if a filtered watch covers it).
        let before = self
            .filtered_watch_covers(self.ports.get(port).name())
            .then(|| {
                let s = &self.sessions[owner as usize];
                let value: Box<[u8]> = self.ports.value(port).into();
                (s.id, s.node.clone(), value)
            });
        let token = self.ports.clear_owner(port);
        self.stats.releases_total += 1;
        if self.recovery_until.is_some() {
            // Only a known port can have an owner in the window: once free it stays
            // known (its next waiter is granted it below, or anyone may register it).
            self.settled.insert(self.ports.get(port).name().into());
        }
        let has_extra = self.ports.extra(port).is_some();
        if has_extra || !self.prefix_watches.is_empty() {
            let name: Box<[u8]> = self.ports.get(port).name().into();
            let record = before.as_ref().map(|(session, node, value)| Record {
                name: &name,
                value,
                session: *session,
                node,
                token,
                event: Some("released"),
            });
            let ev = Event::Released { port: &name, token };
            self.notify_watchers(port, &name, &ev, record.as_ref(), out);
            if self.ports.extra(port).is_some_and(|x| !x.queue.is_empty()) {
                self.grant_first_waiter(port, &name, out);
            }
        }
        self.ports.remove_if_unused(port);
    }

    /// Grants the free port at `port` (named `name`) to the first session in its
    /// queue, which gets ACQUIRED.
    pub(super) fn grant_first_waiter(&mut self, port: u32, name: &[u8], out: &mut impl Outbox) {
        let w = self
            .ports
            .extra_mut(port)
            .queue
            .pop_front()
            .expect("the caller checked the queue");
        self.stats.waiters -= 1;
        let waits = &mut self.sessions[w.session as usize].waits;
        if let Some(i) = waits.iter().position(|&p| p == port) {
            waits.swap_remove(i);
        }
        let token = self.grant(port, w.session, &w.value, out);
        self.deliver(w.session, &Event::Acquired { port: name, token }, out);
    }

    pub(super) fn register(
        &mut self,
        b: &Batch,
        name: &[u8],
        value: &[u8],
        wait: bool,
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.stats.registers_total += 1;
        self.check_name(name)?;
        self.check_value(value)?;
        let me = b.session;
        let s = &self.sessions[me as usize];
        let held = s.ports.len() + s.waits.len();
        let recovering = self.unknown(name);
        let port = match self.ports.find(name) {
            Some(port) => port,
            None if recovering => {
                // Unknown until its owner reclaims it or the window closes.
                if !wait {
                    return Err(RECOVERING);
                }
                self.room_for_a_port()?;
                let port = self.ports.insert(name);
                let r = self.enqueue(me, port, value);
                match r {
                    Ok(_) => self.recovery_waits.push(port),
                    Err(_) => self.ports.remove_if_unused(port),
                }
                return r;
            }
            None => {
                if held >= self.cfg.ports_per_session_max as usize {
                    return Err(PORTS_FULL);
                }
                self.room_for_a_port()?;
                let port = self.ports.insert(name);
                let token = self.grant(port, me, value, out);
                return Ok(Reply::Registered { token });
            }
        };
        let owner = self.ports.get(port).owner;
        if owner == me {
            // Registering a port you own refreshes its value and keeps the grant.
            self.ports.set_value(port, value);
            return Ok(Reply::Registered {
                token: self.ports.get(port).token,
            });
        }
        if owner == NONE && recovering {
            if !wait {
                return Err(RECOVERING);
            }
            let r = self.enqueue(me, port, value);
            if r.is_ok() {
                self.recovery_waits.push(port);
            }
            return r;
        }
        if owner == NONE {
            if held >= self.cfg.ports_per_session_max as usize {
                return Err(PORTS_FULL);
            }
            let token = self.grant(port, me, value, out);
            return Ok(Reply::Registered { token });
        }
        if !wait {
            return Err(Fail::Taken { port, owner });
        }
        self.enqueue(me, port, value)
    }

    /// Whether the table may take one more port (`ports_max`). A RECLAIM is not
    /// counted against it: it restores a port the earlier master held, within the
    /// same limits, and refusing it would take the port from its owner.
    pub(super) fn room_for_a_port(&self) -> Result<(), Fail> {
        if self.ports.len() as u64 >= self.cfg.ports_max {
            return Err(Fail::Code(
                ErrorCode::PortsFull,
                "the server holds ports_max ports across all sessions",
            ));
        }
        Ok(())
    }

    /// Puts session `me` in the queue of `port` (or tells it its place if it is in
    /// it already).
    pub(super) fn enqueue(
        &mut self,
        me: u32,
        port: u32,
        value: &[u8],
    ) -> Result<Reply<'static>, Fail> {
        let s = &self.sessions[me as usize];
        let held = s.ports.len() + s.waits.len();
        if let Some(pos) = self
            .ports
            .extra(port)
            .and_then(|x| x.queue.iter().position(|w| w.session == me))
        {
            return Ok(Reply::Queued {
                position: pos as u32 + 1,
            });
        }
        if held >= self.cfg.ports_per_session_max as usize {
            return Err(PORTS_FULL);
        }
        let queue_max = self.cfg.queue_len_max as usize;
        let x = self.ports.extra_mut(port);
        if x.queue.len() >= queue_max {
            self.ports.shrink_extra(port);
            return Err(Fail::Code(
                ErrorCode::QueueFull,
                "the port's wait queue holds queue_len_max waiters",
            ));
        }
        let waiter = Waiter {
            session: me,
            value: value.into(),
        };
        // In a recovery window a session of the earlier master taking its place again
        // goes ahead of sessions that queued only since: FIFO as far as clients can
        // restore it (among themselves, re-queued sessions keep the order they came
        // back in).
        let sessions = &self.sessions;
        let at = if self.recovery_until.is_some() && sessions[me as usize].adopted {
            x.queue
                .iter()
                .position(|w| !sessions[w.session as usize].adopted)
                .unwrap_or(x.queue.len())
        } else {
            x.queue.len()
        };
        x.queue.insert(at, waiter);
        let position = at as u32 + 1;
        self.sessions[me as usize].waits.push(port);
        self.stats.waiters += 1;
        Ok(Reply::Queued { position })
    }

    pub(super) fn unregister(
        &mut self,
        b: &Batch,
        name: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.check_name(name)?;
        let me = b.session;
        let Some(port) = self.ports.find(name) else {
            return Err(Fail::Code(
                ErrorCode::NotOwner,
                "this session neither owns nor waits for the port",
            ));
        };
        if self.ports.get(port).owner == me {
            self.release(port, out);
            return Ok(Reply::Ok);
        }
        let queued = self
            .ports
            .extra(port)
            .is_some_and(|x| x.queue.iter().any(|w| w.session == me));
        if queued {
            self.ports.extra_mut(port).queue.retain(|w| w.session != me);
            self.stats.waiters -= 1;
            let waits = &mut self.sessions[me as usize].waits;
            if let Some(i) = waits.iter().position(|&p| p == port) {
                waits.swap_remove(i);
            }
            self.ports.remove_if_unused(port);
            return Ok(Reply::Ok);
        }
        Err(Fail::Code(
            ErrorCode::NotOwner,
            "this session neither owns nor waits for the port",
        ))
    }

    pub(super) fn query(&mut self, conn: ConnId, id: u32, name: &[u8], out: &mut impl Outbox) {
        if let Err(Fail::Code(code, msg)) = self.check_name(name) {
            return self.error(conn, id, code, msg, out);
        }
        let owned = self
            .ports
            .find(name)
            .filter(|&p| self.ports.get(p).owner != NONE);
        match owned {
            None if self.unknown(name) => {
                let Fail::Code(code, msg) = RECOVERING else {
                    unreachable!()
                };
                self.error(conn, id, code, msg, out)
            }
            None => out.reply(conn, id, &Reply::Free),
            Some(port) => {
                let e = self.ports.get(port);
                let s = &self.sessions[e.owner as usize];
                out.reply(
                    conn,
                    id,
                    &Reply::Owner {
                        session: s.id,
                        token: e.token,
                        node: &s.node,
                        value: self.ports.value(port),
                    },
                );
            }
        }
    }
}
