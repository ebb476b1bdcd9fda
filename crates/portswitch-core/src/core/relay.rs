//! SEND and BROADCAST: messages relayed to port owners.

use super::*;

impl Core {
    pub(super) fn send(
        &mut self,
        b: &Batch,
        name: &[u8],
        payload: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.check_name(name)?;
        if payload.len() > self.cfg.payload_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::PayloadTooLarge,
                "payload larger than payload_bytes_max",
            ));
        }
        let Some(port) = self
            .ports
            .find(name)
            .filter(|&p| self.ports.get(p).owner != NONE)
        else {
            if self.unknown(name) {
                return Err(RECOVERING);
            }
            return Ok(Reply::NoOwner);
        };
        let owner = &self.sessions[self.ports.get(port).owner as usize];
        let Some(conn) = owner.conn else {
            return Err(Fail::Code(
                ErrorCode::OwnerUnreachable,
                "the owner has no connection now",
            ));
        };
        let from = self.sessions[b.session as usize].id;
        out.event(
            conn,
            &Event::Message {
                from,
                port: name,
                payload,
            },
        );
        self.stats.messages_relayed_total += 1;
        Ok(Reply::Delivered)
    }

    pub(super) fn broadcast(
        &mut self,
        b: &Batch,
        prefix: Option<&[u8]>,
        payload: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        if payload.len() > self.cfg.payload_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::PayloadTooLarge,
                "payload larger than payload_bytes_max",
            ));
        }
        let from = self.sessions[b.session as usize].id;
        let budget = self.cfg.broadcast_fanout_bytes_max;
        let per = payload.len() as u64 + 64;
        let mut count = 0u64;
        match prefix {
            None => {
                if per.saturating_mul(self.conn_sessions.len() as u64) > budget {
                    return Err(Fail::Code(
                        ErrorCode::PayloadTooLarge,
                        "payload x recipients exceeds broadcast_fanout_bytes_max",
                    ));
                }
                for (slot, s) in self.sessions.iter() {
                    if slot as u32 == b.session {
                        continue;
                    }
                    if let Some(conn) = s.conn {
                        out.event(
                            conn,
                            &Event::Message {
                                from,
                                port: &[],
                                payload,
                            },
                        );
                        count += 1;
                    }
                }
            }
            Some(prefix) => {
                if prefix.len() > self.cfg.port_name_bytes_max as usize {
                    return Err(Fail::Code(
                        ErrorCode::NameTooLong,
                        "prefix longer than port_name_bytes_max",
                    ));
                }
                let sessions = &self.sessions;
                let mut matches = 0u64;
                self.ports.scan(0, usize::MAX, |_, e| {
                    if e.name().starts_with(prefix) && sessions[e.owner as usize].conn.is_some() {
                        matches += 1;
                    }
                    true
                });
                if per.saturating_mul(matches) > budget {
                    return Err(Fail::Code(
                        ErrorCode::PayloadTooLarge,
                        "payload x recipients exceeds broadcast_fanout_bytes_max",
                    ));
                }
                self.ports.scan(0, usize::MAX, |_, e| {
                    if e.name().starts_with(prefix) {
                        if let Some(conn) = sessions[e.owner as usize].conn {
                            out.event(
                                conn,
                                &Event::Message {
                                    from,
                                    port: e.name(),
                                    payload,
                                },
                            );
                            count += 1;
                        }
                    }
                    true
                });
            }
        }
        self.stats.messages_relayed_total += count;
        Ok(Reply::Count { count })
    }
}
