//! The feed: whole frames from a connection handled under one lock.

use super::*;

impl Shared {
    /// Takes a HELLO token, refilling at `hello_rate_max` per second (burst: one
    /// second's worth). False: refuse this HELLO with `overloaded`.
    pub(super) fn admit_hello(
        &self,
        c: &mut Counters,
        tokens: &mut f64,
        refilled_ms: &mut u64,
    ) -> bool {
        let rate = self.cfg.hello_rate_max as f64;
        let real = self.start.elapsed().as_millis() as u64;
        *tokens = (*tokens + (real.saturating_sub(*refilled_ms)) as f64 * rate / 1_000.0).min(rate);
        *refilled_ms = real;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            c.hellos_throttled_total += 1;
            false
        }
    }

    /// Feeds bytes read from `conn`: every whole frame at the front of `buf` is
    /// processed under one lock, except the first `skip` messages of the first frame
    /// (handled before a [`Fed::Suspended`]).
    pub(crate) fn feed(&self, conn: ConnId, buf: &[u8], mut skip: usize) -> Fed {
        let frame_max = self.cfg.core.frame_bytes_max as usize;
        let commands_max = self.cfg.core.commands_per_frame_max as usize;
        let mut st = self.lock();
        let locked_at = Instant::now();
        let st = &mut *st;
        let now = self.now_ms(st);
        let serving = self.may_serve(st);
        // A connection being closed (GOAWAY sent: deposed, expired, slow, taken over)
        // reads nothing more: in particular, a master that is deposed and elected
        // again must not answer an old connection's PING from its new core, which
        // would look to the client like proof that its session is alive.
        let Some((mut channel, logged_in)) = st
            .conns
            .get(conn_key(conn))
            .filter(|c| c.id == conn && !c.closing)
            .map(|c| (c.in_channel, c.logged_in))
        else {
            return Fed::Close;
        };
        // A stranger's frames are small: it cannot make the server buffer 1 MiB.
        let frame_max = if logged_in {
            frame_max
        } else {
            frame_max.min(self.cfg.frame_bytes_before_login_max as usize)
        };
        let channels_max = self.cfg.core.channels_per_connection_max;
        // What a member that does not serve answers: who the master is, or (taking
        // over) when to come back, so clients need not poll.
        let (not_master, retry_ms, master): (&[u8], u32, &[u8]) = match &st.serving {
            Serving::Yes => (b"", 0, b""),
            Serving::No {
                serve_at: Some(at), ..
            } => (
                b"taking over as master",
                (at.saturating_duration_since(Instant::now()).as_millis() + 1) as u32,
                b"",
            ),
            Serving::No {
                master: Some(addr), ..
            } => (b"this member is not the master", 0, addr.as_slice()),
            Serving::No { master: None, .. } => (NO_MASTER_YET, 0, b""),
        };
        let mut consumed = 0;
        let mut close = false;
        let mut suspended = None;
        loop {
            let rest = &buf[consumed..];
            let n = match frame_len(rest, frame_max) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    close = true;
                    st.goaway(conn, &e);
                    break;
                }
            };
            let mut vconn = on_channel(conn, channel);
            // The frames handled under this one lock, and the channels they address,
            // share one budget of filter evaluations (`filter_evals_per_batch_max`).
            let mut batch = if consumed == 0 {
                st.core.begin_batch(vconn, now)
            } else {
                st.core.continue_batch(vconn, now)
            };
            let mut out = Out {
                conns: &mut st.conns,
                dirty: &mut st.dirty,
                denials: &mut st.denials,
            };
            for (i, m) in messages(&rest[4..n], commands_max).enumerate() {
                if i < skip {
                    continue; // handled before this frame was suspended
                }
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        close = true;
                        break_with_goaway(&mut out, conn, &e);
                        break;
                    }
                };
                if m.opcode == op::CHANNEL {
                    if m.id >= channels_max {
                        close = true;
                        let msg = format!(
                            "channel {} is past this server's channels_per_connection_max ({channels_max})",
                            m.id
                        );
                        out.event(
                            conn,
                            &Event::GoAway {
                                code: ErrorCode::ChannelsMax,
                                message: msg.as_bytes(),
                            },
                        );
                        out.close(conn);
                        break;
                    }
                    channel = m.id as u16;
                    vconn = on_channel(conn, channel);
                    if channel != 0 {
                        if let Some(c) = out.conns.get_mut(conn_key(conn)) {
                            c.mark(channel);
                        }
                    }
                    // A frame renews the session of every channel it addresses.
                    batch = st.core.continue_batch(vconn, now);
                    continue;
                }
                match Request::decode(m.opcode, m.body) {
                    Ok(Request::Stats) => {
                        let mut snap = stats_snapshot(
                            &st.core,
                            out.conns.len(),
                            st.counters,
                            st.stalled_ms,
                            self.start,
                        );
                        self.member_stats(&mut snap, st.role);
                        let mut entries = std::mem::take(&mut st.scratch);
                        entries.clear();
                        let pairs = snap.pairs();
                        for (name, value) in &pairs {
                            encode_stat(&mut entries, name, *value);
                        }
                        out.reply(
                            vconn,
                            m.id,
                            &Reply::Stats {
                                count: pairs.len() as u16,
                                entries: &entries,
                            },
                        );
                        st.scratch = entries;
                    }
                    Ok(Request::Ping) if !serving => out.reply(vconn, m.id, &Reply::Ok),
                    Ok(_) if !serving => out.reply(
                        vconn,
                        m.id,
                        &Reply::Error {
                            code: ErrorCode::NotMaster,
                            message: not_master,
                            retry_ms,
                            master,
                        },
                    ),
                    Ok(Request::Admin { command }) if MemberOp::parse(command).is_some() => {
                        let caller = st
                            .core
                            .session_user(vconn)
                            .and_then(|(u, a)| Some((u?, a?)));
                        let addr = addr_of(out.conns, conn);
                        let op = MemberOp::parse(command).expect("checked");
                        match (st.auth.check_admin(caller, addr), op) {
                            (Err((code, msg)), _) => {
                                refuse(&mut out, vconn, m.id, code, msg.as_bytes())
                            }
                            (Ok(_), MemberOp::Bad(why)) => refuse(
                                &mut out,
                                vconn,
                                m.id,
                                ErrorCode::InvalidArgument,
                                why.as_bytes(),
                            ),
                            (Ok(_), _) if self.member.is_none() => refuse(
                                &mut out,
                                vconn,
                                m.id,
                                ErrorCode::InvalidArgument,
                                b"this server is not a member of a group (--node-id, --member)",
                            ),
                            (Ok(_), MemberOp::List) => {
                                let status = self.cluster_status();
                                let json = serde_json::to_string(&status).unwrap_or_default();
                                out.reply(
                                    vconn,
                                    m.id,
                                    &Reply::AdminOk {
                                        result: json.as_bytes(),
                                    },
                                );
                            }
                            (Ok(who), op) => {
                                st.auth.audit(serde_json::json!({
                                    "event": "admin",
                                    "by": who,
                                    "op": format!("{op:?}"),
                                    "addr": addr.to_string(),
                                }));
                                let answered = self.start_member_op(vconn, m.id, op);
                                suspended = Some((i + 1, answered));
                                break;
                            }
                        }
                    }
                    Ok(Request::Hello(h))
                        if h.lease_ms <= self.cfg.core.lease_ms_max
                            && self
                                .ceiling
                                .as_ref()
                                .is_some_and(|k| k.must_raise(h.lease_ms)) =>
                    {
                        let retry_ms = (RAISE_RETRY_MS + fastrand_ms(10)) as u32;
                        let msg = format!(
                            "raising the master's lease ceiling to {} ms; retry in {retry_ms} ms",
                            h.lease_ms,
                        );
                        overloaded(&mut out, vconn, m.id, msg.as_bytes(), retry_ms);
                    }
                    Ok(Request::Hello(_))
                        if !self.admit_hello(
                            &mut st.counters,
                            &mut st.hello_tokens,
                            &mut st.hello_refilled_ms,
                        ) =>
                    {
                        let wait = 1_000 / self.cfg.hello_rate_max.max(1) as u64 + 1;
                        let retry_ms = (wait + fastrand_ms(50)) as u32;
                        let msg = format!(
                            "too many sessions opening at once (hello_rate_max); retry in {retry_ms} ms"
                        );
                        overloaded(&mut out, vconn, m.id, msg.as_bytes(), retry_ms);
                    }
                    Ok(Request::Admin { command }) if st.auth.replicated().is_some() => {
                        // A group's users: a change is written through the group first.
                        let caller = st
                            .core
                            .session_user(vconn)
                            .and_then(|(u, a)| Some((u?, a?)));
                        let addr = addr_of(out.conns, conn);
                        let mut salt = [0u8; portswitch_auth::scram::SALT_BYTES];
                        fill_random(&mut salt);
                        match st.auth.admin(caller, addr, command, &salt) {
                            Ok(AdminOutcome::Done { answer, deleted }) => {
                                if let Some(user) = deleted {
                                    st.core.end_sessions_of(&user, now, &mut out);
                                }
                                out.reply(
                                    vconn,
                                    m.id,
                                    &Reply::AdminOk {
                                        result: answer.as_bytes(),
                                    },
                                );
                            }
                            Ok(AdminOutcome::Replicate {
                                expect,
                                store,
                                answer,
                                audit,
                                deleted,
                            }) => {
                                let change = UsersChange {
                                    expect,
                                    store,
                                    answer,
                                    audit,
                                    deleted,
                                };
                                let answered = self.start_users_op(vconn, m.id, change);
                                suspended = Some((i + 1, answered));
                                break;
                            }
                            Err((code, msg)) => refuse(&mut out, vconn, m.id, code, msg.as_bytes()),
                        }
                    }
                    Ok(req) if is_edge(&req) => edge(
                        &mut st.auth,
                        &mut st.core,
                        &mut batch,
                        &mut out,
                        vconn,
                        m.id,
                        &req,
                        now,
                    ),
                    Ok(req) => st.core.handle(&mut batch, m.id, &req, &mut out),
                    Err(e) => out.reply(vconn, m.id, &Reply::error(e.code, e.detail.as_bytes())),
                }
            }
            if close {
                st.counters.malformed_total += 1;
                break;
            }
            if suspended.is_some() {
                break;
            }
            skip = 0;
            consumed += n;
        }
        for (user, perm, name) in st.denials.drain(..) {
            st.auth.audit(serde_json::json!({
                "event": "denied",
                "user": user,
                "perm": perm.name(),
                "name": String::from_utf8_lossy(&name),
            }));
        }
        if !logged_in && !close {
            let c = st.conns.get(conn_key(conn));
            let now_in = c.is_some_and(|c| {
                c.ids()
                    .into_iter()
                    .any(|id| st.core.session_user(id).is_some())
            });
            if now_in {
                if let Some(c) = st.conns.get_mut(conn_key(conn)) {
                    c.logged_in = true;
                }
            }
        }
        let ids = match st.conns.get_mut(conn_key(conn)) {
            Some(c) => {
                c.in_channel = channel;
                if close {
                    c.ids()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        if close {
            // The core forgets the connection now; its sessions (if not ending on
            // disconnect) stay for their lease, resumable from another connection.
            let mut out = Out {
                conns: &mut st.conns,
                dirty: &mut st.dirty,
                denials: &mut st.denials,
            };
            for id in ids {
                st.core.handle_disconnect(id, now, &mut out);
            }
        }
        self.flush(st, now);
        st.counters.feed_lock_ns += locked_at.elapsed().as_nanos() as u64;
        match suspended {
            _ if close => Fed::Close,
            Some((skip, answered)) => Fed::Suspended {
                consumed,
                skip,
                answered,
            },
            None => Fed::Consumed(consumed),
        }
    }
}

/// Answers `overloaded`, saying when to ask again.
fn overloaded(out: &mut Out<'_>, conn: ConnId, id: u32, msg: &[u8], retry_ms: u32) {
    let reply = Reply::Error {
        code: ErrorCode::Overloaded,
        message: msg,
        retry_ms,
        master: b"",
    };
    out.reply(conn, id, &reply);
}
