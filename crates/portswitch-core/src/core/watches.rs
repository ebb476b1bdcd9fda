//! Watches of ports and prefixes, and the events they get.

use super::*;

impl Core {
    pub(super) fn notify_watchers(
        &mut self,
        port: u32,
        name: &[u8],
        ev: &Event<'_>,
        out: &mut impl Outbox,
    ) {
        if let Some(x) = self.ports.extra(port) {
            if !x.watchers.is_empty() {
                let watchers = x.watchers.clone();
                for w in watchers {
                    self.deliver(w, ev, out);
                }
            }
        }
        if !self.prefix_watches.is_empty() {
            let targets: Vec<u32> = self
                .prefix_watches
                .iter()
                .filter(|p| name.starts_with(&p.prefix))
                .map(|p| p.session)
                .collect();
            for w in targets {
                self.deliver(w, ev, out);
            }
        }
    }

    pub(super) fn watch(
        &mut self,
        b: &Batch,
        name: &[u8],
        prefix: bool,
    ) -> Result<Reply<'static>, Fail> {
        let me = b.session;
        if !prefix {
            self.check_name(name)?;
        } else if name.len() > self.cfg.port_name_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::NameTooLong,
                "prefix longer than port_name_bytes_max",
            ));
        }
        let s = &self.sessions[me as usize];
        let watching = s.watches.len() + s.prefix_watches as usize;
        if prefix {
            if self
                .prefix_watches
                .iter()
                .any(|p| p.session == me && &*p.prefix == name)
            {
                return Ok(Reply::Watching { owner: None });
            }
            if watching >= self.cfg.watches_per_session_max as usize {
                return Err(WATCHES_FULL);
            }
            if self.prefix_watches.len() >= self.cfg.prefix_watches_max as usize {
                return Err(Fail::Code(
                    ErrorCode::PrefixWatchesMax,
                    "the server holds prefix_watches_max prefix watches",
                ));
            }
            self.prefix_watches.push(PrefixWatch {
                prefix: name.into(),
                session: me,
            });
            self.sessions[me as usize].prefix_watches += 1;
            self.stats.watches += 1;
            return Ok(Reply::Watching { owner: None });
        }
        let port = match self.ports.find(name) {
            Some(port) => port,
            None => {
                if watching >= self.cfg.watches_per_session_max as usize {
                    return Err(WATCHES_FULL);
                }
                self.room_for_a_port()?;
                self.ports.insert(name)
            }
        };
        let already = self
            .ports
            .extra(port)
            .is_some_and(|x| x.watchers.contains(&me));
        if !already {
            if watching >= self.cfg.watches_per_session_max as usize {
                self.ports.remove_if_unused(port);
                return Err(WATCHES_FULL);
            }
            self.ports.extra_mut(port).watchers.push(me);
            self.sessions[me as usize].watches.push(port);
            self.stats.watches += 1;
        }
        let e = self.ports.get(port);
        let owner = (e.owner != NONE).then(|| (self.sessions[e.owner as usize].id, e.token));
        Ok(Reply::Watching { owner })
    }

    pub(super) fn unwatch(
        &mut self,
        b: &Batch,
        name: &[u8],
        prefix: bool,
    ) -> Result<Reply<'static>, Fail> {
        let me = b.session;
        if prefix {
            let before = self.prefix_watches.len();
            self.prefix_watches
                .retain(|p| !(p.session == me && &*p.prefix == name));
            let removed = (before - self.prefix_watches.len()) as u32;
            self.sessions[me as usize].prefix_watches -= removed;
            self.stats.watches -= removed as u64;
            return Ok(Reply::Ok);
        }
        self.check_name(name)?;
        if let Some(port) = self.ports.find(name) {
            let watching = self
                .ports
                .extra(port)
                .is_some_and(|x| x.watchers.contains(&me));
            if watching {
                self.ports.extra_mut(port).watchers.retain(|&w| w != me);
                let ws = &mut self.sessions[me as usize].watches;
                if let Some(i) = ws.iter().position(|&p| p == port) {
                    ws.swap_remove(i);
                }
                self.stats.watches -= 1;
                self.ports.remove_if_unused(port);
            }
        }
        Ok(Reply::Ok)
    }
}
