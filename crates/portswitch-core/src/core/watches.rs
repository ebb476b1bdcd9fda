//! Watches of ports and prefixes, and the events they get.

use super::*;

impl Core {
    /// Tells the port's watchers and the prefix watches it falls under about `ev`.
    /// `record` is the port as filters see it: given whenever a filtered prefix watch
    /// covers `name` (see [`Core::filtered_watch_covers`]), and then evaluated by each
    /// filtered watch whose prefix matches, all sharing the variables built from it
    /// (each at most once for the event); a failed evaluation is counted and delivers
    /// nothing.
    pub(super) fn notify_watchers(
        &mut self,
        port: u32,
        name: &[u8],
        ev: &Event<'_>,
        record: Option<&Record<'_>>,
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
            let mut errors = 0u64;
            let mut derived = record.map(|r| Derived::new(*r));
            let targets: Vec<u32> = self
                .prefix_watches
                .iter()
                .filter(|p| name.starts_with(&p.prefix))
                .filter(|p| match (&p.filter, derived.as_mut()) {
                    (None, _) => true,
                    (Some(f), Some(d)) => f.matches_derived(d).unwrap_or_else(|_| {
                        errors += 1;
                        false
                    }),
                    // Callers pass a record whenever a filtered watch exists.
                    (Some(_), None) => false,
                })
                .map(|p| p.session)
                .collect();
            self.stats.filter_errors_total += errors;
            for w in targets {
                self.deliver(w, ev, out);
            }
        }
    }

    /// Whether some filtered prefix watch covers the port `name`: only then do a
    /// grant or a release build the record filters see.
    pub(super) fn filtered_watch_covers(&self, name: &[u8]) -> bool {
        self.watch_filters > 0
            && self
                .prefix_watches
                .iter()
                .any(|p| p.filter.is_some() && name.starts_with(&p.prefix))
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
            if let Some(p) = self
                .prefix_watches
                .iter_mut()
                .find(|p| p.session == me && &*p.prefix == name)
            {
                // The latest WATCH of a prefix says its filter: none, now.
                if p.filter.take().is_some() {
                    self.watch_filters -= 1;
                }
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
                filter: None,
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
            let removed = self.drop_prefix_watches(|p| p.session == me && &*p.prefix == name);
            self.sessions[me as usize].prefix_watches -= removed;
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

    /// Removes the prefix watches `which` selects (keeping the counts of watches and
    /// filters); returns how many.
    pub(super) fn drop_prefix_watches(&mut self, which: impl Fn(&PrefixWatch) -> bool) -> u32 {
        let before = self.prefix_watches.len();
        let mut filters = 0u32;
        self.prefix_watches.retain(|p| {
            let drop = which(p);
            filters += u32::from(drop && p.filter.is_some());
            !drop
        });
        self.watch_filters -= filters;
        let removed = (before - self.prefix_watches.len()) as u32;
        self.stats.watches -= removed as u64;
        removed
    }

    /// WATCH of a prefix with a filter (WATCH_WHERE). The filter is compiled once,
    /// here (or taken from the cache of compiled filters); watching a prefix the
    /// session already watches replaces its filter. A session holds at most
    /// `watch_filters_per_session_max` filtered watches, the server
    /// `watch_filters_max`.
    pub(super) fn watch_where(
        &mut self,
        b: &Batch,
        id: u32,
        prefix: &[u8],
        source: &[u8],
        out: &mut impl Outbox,
    ) {
        let me = b.session;
        let result = (|| {
            if prefix.len() > self.cfg.port_name_bytes_max as usize {
                return Err(Fail::Code(
                    ErrorCode::NameTooLong,
                    "prefix longer than port_name_bytes_max",
                ));
            }
            let existing = self
                .prefix_watches
                .iter()
                .position(|p| p.session == me && &*p.prefix == prefix);
            let s = &self.sessions[me as usize];
            if existing.is_none() {
                if s.watches.len() + s.prefix_watches as usize
                    >= self.cfg.watches_per_session_max as usize
                {
                    return Err(WATCHES_FULL);
                }
                if self.prefix_watches.len() >= self.cfg.prefix_watches_max as usize {
                    return Err(Fail::Code(
                        ErrorCode::PrefixWatchesMax,
                        "the server holds prefix_watches_max prefix watches",
                    ));
                }
            }
            let had_filter = existing.is_some_and(|i| self.prefix_watches[i].filter.is_some());
            if !had_filter && self.watch_filters >= self.cfg.watch_filters_max {
                return Err(Fail::Code(
                    ErrorCode::PrefixWatchesMax,
                    "the server holds watch_filters_max filtered prefix watches",
                ));
            }
            if !had_filter {
                let mine = self
                    .prefix_watches
                    .iter()
                    .filter(|p| p.session == me && p.filter.is_some())
                    .count();
                if mine >= self.cfg.watch_filters_per_session_max as usize {
                    return Err(Fail::Code(
                        ErrorCode::PrefixWatchesMax,
                        "session holds watch_filters_per_session_max filtered prefix watches",
                    ));
                }
            }
            Ok(existing)
        })();
        let existing = match result {
            Ok(existing) => existing,
            Err(Fail::Code(code, msg)) => return self.error(b.conn, id, code, msg, out),
            Err(Fail::Taken { .. }) => unreachable!("a watch is never taken"),
        };
        let filter = match self.filter_cache.compile(source, Scope::Watch) {
            Ok(f) => f,
            Err(msg) => return self.error(b.conn, id, ErrorCode::QueryInvalid, &msg, out),
        };
        match existing {
            Some(i) => {
                if self.prefix_watches[i].filter.replace(filter).is_none() {
                    self.watch_filters += 1;
                }
            }
            None => {
                self.prefix_watches.push(PrefixWatch {
                    prefix: prefix.into(),
                    session: me,
                    filter: Some(filter),
                });
                self.watch_filters += 1;
                self.sessions[me as usize].prefix_watches += 1;
                self.stats.watches += 1;
            }
        }
        out.reply(b.conn, id, &Reply::Watching { owner: None });
    }
}
