//! LIST: pages of ports under a prefix.

use super::*;

impl Core {
    pub(super) fn list(
        &mut self,
        conn: ConnId,
        id: u32,
        prefix: &[u8],
        cursor: u64,
        limit: u32,
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
}
