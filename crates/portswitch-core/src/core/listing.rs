//! LIST: pages of ports under a prefix; LIST_WHERE: only those a filter selects.

use super::*;

/// The cursor of a LIST_WHERE page that stopped before it examined anything, at the
/// start of the table (the batch's budget of filter evaluations was spent): slot 0,
/// which a cursor of 0 cannot say (0 means "done"). Above every slot (slots are
/// `u32`), so no other cursor is ever equal to it.
const CURSOR_FROM_SLOT_0: u64 = 1 << 32;

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
            if self.filter_evals_left == 0 {
                // This batch's LIST_WHEREs have made all the evaluations it allows:
                // an empty page that resumes where this one would have started.
                let next_cursor = match cursor {
                    0 => CURSOR_FROM_SLOT_0,
                    CURSOR_FROM_SLOT_0 => CURSOR_FROM_SLOT_0,
                    c if c >= self.ports.slots() as u64 => 0,
                    c => c,
                };
                return out.reply(
                    conn,
                    id,
                    &Reply::Page {
                        next_cursor,
                        count: 0,
                        entries: &[],
                    },
                );
            }
            return match self.filter_cache.compile(source, Scope::List) {
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
    /// most `list_filter_entries_max` ports are evaluated per call, and at most what is
    /// left of the batch's `filter_evals_per_batch_max` (at least 1: the caller
    /// answers for a spent budget).
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
        let evals_max = self.cfg.list_filter_entries_max.min(self.filter_evals_left);
        debug_assert!(evals_max >= 1);
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let (mut count, mut evals, mut errors) = (0u32, 0u32, 0u64);
        let from = if cursor == CURSOR_FROM_SLOT_0 {
            0
        } else {
            cursor.min(self.ports.slots() as u64) as usize
        };
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
        self.filter_evals_left -= evals;
        let next_cursor = if stopped >= self.ports.slots() {
            0
        } else {
            stopped as u64
        };
        // The scan stops only after evaluating at least one port (limit ≥ 1,
        // evals_max ≥ 1, and an empty page fits any entry), so a stop is past `from`
        // and a continuation cursor is never 0.
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
