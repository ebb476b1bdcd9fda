//! The recovery window of a master that took over: unknown ports, RECLAIM, and what
//! happens when the window closes.

use super::*;

impl Core {
    /// Opens a **recovery window** of `window_ms` from `now_ms` on a core that has just
    /// taken over from an earlier master (docs/PROTOCOL.md, "Failover and the recovery
    /// window"). Until it closes: a HELLO resuming a session of the earlier master
    /// (right id and secret under the group's keys) is adopted with its id; adopted sessions RECLAIM their ports with their tokens; a
    /// port nobody has reclaimed is unknown — REGISTER fails with `recovering` (or with
    /// WAIT queues for it), QUERY and SEND fail with `recovering`. When it closes,
    /// unreclaimed ports are free, their first waiters are granted them, and every
    /// session gets RECOVERED. The window must be at least the longest lease the
    /// earlier master could have granted, plus the clock-drift margin, counted from
    /// when that master's own lease had certainly run out.
    pub fn start_recovery(&mut self, now_ms: u64, window_ms: u64) {
        self.advance(now_ms);
        assert!(
            self.sessions.is_empty() && self.ports.is_empty(),
            "a recovery window opens on a fresh core"
        );
        self.recovery_until = Some(now_ms + window_ms);
    }

    /// Whether `name` is unknown to this master yet: its recovery window is open and
    /// nobody has reclaimed the port (or released it after reclaiming it).
    pub(super) fn unknown(&self, name: &[u8]) -> bool {
        self.recovery_until.is_some() && !self.settled.contains(name)
    }

    /// Milliseconds left of the recovery window (`None` when not recovering).
    pub fn recovery_left_ms(&self) -> Option<u64> {
        self.recovery_until
            .map(|until| until.saturating_sub(self.now_ms))
    }

    /// The recovery window is over: whatever nobody reclaimed is free. Ports that got
    /// waiters meanwhile go to their first waiter; every session hears RECOVERED.
    pub(super) fn close_recovery(&mut self, out: &mut impl Outbox) {
        self.recovery_until = None;
        self.settled = Default::default();
        let mut waits = std::mem::take(&mut self.recovery_waits);
        waits.sort_unstable();
        waits.dedup();
        for port in waits {
            // The slot may have been emptied (everyone left the queue) and reused; a
            // port without an owner but with waiters only arises in the window, so any
            // such slot is one to grant.
            if !self.ports.is_live(port) || self.ports.get(port).owner != NONE {
                continue;
            }
            if self.ports.extra(port).is_some_and(|x| !x.queue.is_empty()) {
                let name: Box<[u8]> = self.ports.get(port).name().into();
                self.grant_first_waiter(port, &name, out);
            }
            self.ports.remove_if_unused(port);
        }
        let slots: Vec<u32> = self.sessions.iter().map(|(k, _)| k as u32).collect();
        for slot in slots {
            self.deliver(slot, &Event::Recovered, out);
        }
    }

    /// RECLAIM: an adopted session takes back, in the recovery window, a port it
    /// owned on the earlier master, with that grant's token.
    pub(super) fn reclaim(
        &mut self,
        b: &Batch,
        name: &[u8],
        token: u64,
        value: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.check_name(name)?;
        self.check_value(value)?;
        if self.recovery_until.is_none() {
            return Err(Fail::Code(
                ErrorCode::ReclaimRefused,
                "no recovery window is open: REGISTER instead",
            ));
        }
        let me = b.session;
        if !self.sessions[me as usize].adopted {
            return Err(Fail::Code(
                ErrorCode::ReclaimRefused,
                "only a session resumed from an earlier master may reclaim",
            ));
        }
        // Tokens this master grants carry its epoch; a reclaimed one must be older, so
        // that every later grant of the port still carries a higher token.
        if token == 0 || token >> 32 >= self.epoch {
            return Err(Fail::Code(
                ErrorCode::ReclaimRefused,
                "the token is not from an earlier epoch",
            ));
        }
        let port = match self.ports.find(name) {
            Some(port) => port,
            None => self.ports.insert(name),
        };
        let owner = self.ports.get(port).owner;
        if owner == me {
            self.ports.set_value(port, value);
            return Ok(Reply::Registered {
                token: self.ports.get(port).token,
            });
        }
        if owner != NONE {
            // Only one session can have held the port when the earlier master stopped;
            // a second claim comes from a client that had lost it (or lies).
            return Err(Fail::Taken { port, owner });
        }
        let s = &self.sessions[me as usize];
        if s.ports.len() + s.waits.len() >= self.cfg.ports_per_session_max as usize {
            self.ports.remove_if_unused(port);
            return Err(PORTS_FULL);
        }
        // A waiter that queued meanwhile stays queued behind the owner.
        self.grant_with(port, me, value, token, out);
        self.stats.ports_reclaimed_total += 1;
        Ok(Reply::Registered { token })
    }
}
