//! LIST: pages of ports under a prefix; LIST_WHERE: only those a filter selects.

use super::*;

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn list(
        &mut self,
        conn: ConnId,
        id: u32,
        prefix: &[u8],
        cursor: u64,
        limit: u32,
        filter: Option<&[u8]>,
        out: &mut impl Outbox,
    ) {
        if limit == 0 || limit > self.cfg.list_limit_max {
            return self.error(
                conn,
                id,
                ErrorCode::ListLimit,
                "limit must be in [1, list_limit_max]",
                out,
            );
        }
        if prefix.len() > self.cfg.port_name_bytes_max as usize {
            return self.error(
                conn,
                id,
                ErrorCode::NameTooLong,
                "prefix longer than port_name_bytes_max",
                out,
            );
        }
        if let Some(source) = filter {
            return match Filter::compile(source, Scope::List) {
                Ok(f) => self.list_where(conn, id, prefix, cursor, limit, &f, out),
                Err(msg) => self.error(conn, id, ErrorCode::QueryInvalid, &msg, out),
            };
        }
        // Room for entries in one frame, after the message header and page header.
        let bytes_max = self.cfg.frame_bytes_max as usize - limits::MESSAGE_HEADER_BYTES - 12;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let mut count = 0u32;
        let from = cursor.min(self.ports.slots() as u64) as usize;
        let sessions = &self.sessions;
        let ports = &self.ports;
        let stopped = ports.scan(from, self.cfg.list_scan_slots_max as usize, |slot, e| {
            if !e.name().starts_with(prefix) {
                return true;
            }
            let s = &sessions[e.owner as usize];
            let entry = PageEntry {
                port: e.name(),
                session: s.id,
                token: e.token,
                node: &s.node,
                value: ports.value(slot),
            };
            if count == limit || buf.len() + entry.encoded_len() > bytes_max {
                return false;
            }
            entry.encode(&mut buf);
            count += 1;
            true
        });
        let next_cursor = if stopped >= self.ports.slots() {
            0
        } else {
            stopped as u64
        };
        // A continuation cursor is never 0 (0 means "from the start" / "done"): a scan
        // that stops at slot 0 has returned nothing, which cannot happen with limit ≥ 1.
        debug_assert!(next_cursor != 0 || stopped >= self.ports.slots() || from > 0);
        out.reply(
            conn,
            id,
            &Reply::Page {
                next_cursor,
                count,
                entries: &buf,
            },
        );
        self.scratch = buf;
    }

    /// LIST_WHERE, its filter compiled: like LIST, but only ports the filter selects
    /// fill the page. The cursor advances over ports the filter rejects (and over ports
    /// it fails on: skipped and counted in `filter_errors_total`, the page goes on), so
    /// a page may be short or empty with a non-zero cursor; 0 still means the end. At
    /// most `list_filter_entries_max` ports are evaluated per call.
    #[allow(clippy::too_many_arguments)]
    fn list_where(
        &mut self,
        conn: ConnId,
        id: u32,
        prefix: &[u8],
        cursor: u64,
        limit: u32,
        filter: &Filter,
        out: &mut impl Outbox,
    ) {
        let bytes_max = self.cfg.frame_bytes_max as usize - limits::MESSAGE_HEADER_BYTES - 12;
        let evals_max = self.cfg.list_filter_entries_max;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let (mut count, mut evals, mut errors) = (0u32, 0u32, 0u64);
        let from = cursor.min(self.ports.slots() as u64) as usize;
        let sessions = &self.sessions;
        let ports = &self.ports;
        let stopped = ports.scan(from, self.cfg.list_scan_slots_max as usize, |slot, e| {
            if !e.name().starts_with(prefix) {
                return true;
            }
            // Stop before a port not yet evaluated: the next page starts with it.
            if count == limit || evals == evals_max {
                return false;
            }
            let s = &sessions[e.owner as usize];
            let entry = PageEntry {
                port: e.name(),
                session: s.id,
                token: e.token,
                node: &s.node,
                value: ports.value(slot),
            };
            // A matching entry that does not fit stops the page before it is evaluated
            // again on the next one; only entries that fit are worth evaluating.
            if buf.len() + entry.encoded_len() > bytes_max {
                return false;
            }
            evals += 1;
            let record = Record {
                name: entry.port,
                value: entry.value,
                session: entry.session,
                node: entry.node,
                token: entry.token,
                event: None,
            };
            match filter.matches(&record) {
                Ok(true) => {
                    entry.encode(&mut buf);
                    count += 1;
                }
                Ok(false) => {}
                Err(_) => errors += 1,
            }
            true
        });
        self.stats.filter_errors_total += errors;
        let next_cursor = if stopped >= self.ports.slots() {
            0
        } else {
            stopped as u64
        };
        // The scan stops only after evaluating at least one port (limit ≥ 1,
        // list_filter_entries_max ≥ 1, and an empty page fits any entry), so a stop
        // is past `from` and a continuation cursor is never 0.
        debug_assert!(next_cursor != 0 || stopped >= self.ports.slots() || from > 0);
        out.reply(
            conn,
            id,
            &Reply::Page {
                next_cursor,
                count,
                entries: &buf,
            },
        );
        self.scratch = buf;
    }
}
