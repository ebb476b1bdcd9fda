//! ADMIN commands that go through the group: membership changes and changes of the
//! group's users, answered once Raft has committed them.

use super::*;

/// A membership command (ADMIN `member_list`, `member_add`, `member_remove`).
#[derive(Debug)]
pub(super) enum MemberOp {
    List,
    Add {
        id: u64,
        member: portswitch_cluster::Member,
    },
    Remove {
        id: u64,
    },
    Bad(String),
}

impl MemberOp {
    /// `None` when the command is not a membership command at all.
    pub(super) fn parse(command: &[u8]) -> Option<MemberOp> {
        let v: serde_json::Value = serde_json::from_slice(command).ok()?;
        let op = v["op"].as_str()?;
        let id = v["id"].as_u64().filter(|&id| id > 0);
        Some(match op {
            "member_list" => MemberOp::List,
            "member_add" => match (id, v["peer_addr"].as_str(), v["client_addr"].as_str()) {
                (Some(id), Some(p), Some(c)) => MemberOp::Add {
                    id,
                    member: portswitch_cluster::Member {
                        peer_addr: p.to_string(),
                        client_addr: c.to_string(),
                    },
                },
                _ => MemberOp::Bad("member_add needs id (> 0), peer_addr and client_addr".into()),
            },
            "member_remove" => match id {
                Some(id) => MemberOp::Remove { id },
                None => MemberOp::Bad("member_remove needs id (> 0)".into()),
            },
            _ => return None,
        })
    }
}

/// A change of a group's users on its way through Raft.
pub(super) struct UsersChange {
    pub(super) expect: u64,
    pub(super) store: String,
    pub(super) answer: String,
    pub(super) audit: serde_json::Value,
    pub(super) deleted: Option<String>,
}

impl Shared {
    /// Starts a membership change for the ADMIN request `id` on `conn`; the answer
    /// is queued when Raft has committed it (or refused), and the returned receiver
    /// then resolves (also if the server went away meanwhile).
    pub(super) fn start_member_op(
        &self,
        conn: ConnId,
        id: u32,
        op: MemberOp,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (answered, rx) = tokio::sync::oneshot::channel();
        let node = self.member.as_ref().map(|m| m.node.clone());
        let me = self.me.get().cloned();
        tokio::spawn(async move {
            let result = match (node, op) {
                (Some(node), MemberOp::Add { id, member }) => node.add_member(id, member).await,
                (Some(node), MemberOp::Remove { id }) => node.remove_member(id).await,
                _ => Err(portswitch_cluster::ClusterError::NoGroup),
            }
            .map_err(|e| e.to_string());
            if let Some(shared) = me.and_then(|w| w.upgrade()) {
                shared.reply_later(conn, id, result);
            }
            let _ = answered.send(());
        });
        rx
    }

    /// Writes a change of the group's users through Raft; when it is committed (or
    /// refused) the change is taken here and answered, and the receiver resolves.
    pub(super) fn start_users_op(
        &self,
        conn: ConnId,
        id: u32,
        change: UsersChange,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (answered, rx) = tokio::sync::oneshot::channel();
        let node = self.member.as_ref().map(|m| m.node.clone());
        let me = self.me.get().cloned();
        tokio::spawn(async move {
            let written = match node {
                Some(node) => node.write_users(change.expect, change.store.clone()).await,
                None => Err(portswitch_cluster::ClusterError::NoGroup),
            };
            if let Some(shared) = me.and_then(|w| w.upgrade()) {
                shared.users_written(conn, id, change, written);
            }
            let _ = answered.send(());
        });
        rx
    }

    /// Answers a request whose answer waited (for Raft): `f` gets the core, the
    /// auth store, the output and the time, under the lock.
    fn answer_later(&self, f: impl FnOnce(&mut Core, &mut Auth, &mut Out<'_>, u64)) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        let mut out = Out {
            conns: &mut st.conns,
            dirty: &mut st.dirty,
            denials: &mut st.denials,
        };
        f(&mut st.core, &mut st.auth, &mut out, now);
        self.flush(st, now);
    }

    pub(super) fn users_written(
        &self,
        conn: ConnId,
        id: u32,
        change: UsersChange,
        written: Result<u64, portswitch_cluster::ClusterError>,
    ) {
        self.answer_later(|core, auth, out, now| match written {
            Ok(version) => {
                auth.adopt_replicated(&change.store, version);
                auth.audit(change.audit);
                if let Some(user) = &change.deleted {
                    core.end_sessions_of(user, now, out);
                }
                let result = change.answer.as_bytes();
                out.reply(conn, id, &Reply::AdminOk { result });
            }
            Err(e) => {
                let code = match e {
                    portswitch_cluster::ClusterError::NotLeader { .. } => ErrorCode::NotMaster,
                    _ => ErrorCode::InvalidArgument,
                };
                refuse(out, conn, id, code, e.to_string().as_bytes());
            }
        });
    }

    pub(super) fn reply_later(
        &self,
        conn: ConnId,
        id: u32,
        result: Result<portswitch_cluster::node::ClusterStatus, String>,
    ) {
        self.answer_later(|_, _, out, _| match result {
            Ok(status) => {
                let json = serde_json::to_string(&status).unwrap_or_default();
                let result = json.as_bytes();
                out.reply(conn, id, &Reply::AdminOk { result });
            }
            Err(e) => refuse(out, conn, id, ErrorCode::InvalidArgument, e.as_bytes()),
        });
    }
}
