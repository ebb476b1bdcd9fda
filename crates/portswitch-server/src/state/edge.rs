//! The server's edge: HELLO with credentials, AUTH and ADMIN are answered here (with
//! `auth.rs`) before the core sees a verified identity.

use super::*;

/// Requests the server answers at its edge rather than passing straight to the core:
/// authentication (HELLO with credentials, or any HELLO where the server needs them),
/// AUTH, and ADMIN.
pub(super) fn is_edge(req: &Request<'_>) -> bool {
    matches!(
        req,
        Request::Hello(_) | Request::Auth { .. } | Request::Admin { .. }
    )
}

pub(super) fn refuse(out: &mut Out<'_>, conn: ConnId, id: u32, code: ErrorCode, msg: &[u8]) {
    out.reply(conn, id, &Reply::error(code, msg));
}

/// Handles an edge request (see [`is_edge`]): verifies credentials here, then hands
/// the core a HELLO with a verified `Identity`, or refuses.
#[allow(clippy::too_many_arguments)]
pub(super) fn edge(
    auth: &mut Auth,
    core: &mut Core,
    batch: &mut portswitch_core::Batch,
    out: &mut Out<'_>,
    conn: ConnId,
    id: u32,
    req: &Request<'_>,
    now: u64,
) {
    let addr = addr_of(out.conns, conn);
    let security = security_of(out.conns, conn);
    match *req {
        // Answered before any authentication step, so a client learns at once.
        Request::Hello(_) if core.session_user(conn).is_some() => refuse(
            out,
            conn,
            id,
            ErrorCode::SessionExists,
            b"this connection (channel) already has a session",
        ),
        Request::Hello(ref h) if auth.enabled() && h.credentials.is_empty() => {
            // A verified client certificate naming a user logs in as that user.
            match security
                .cert_user
                .as_deref()
                .and_then(|u| auth.cert_login(u, addr))
            {
                Some(ident) => core.handle_authenticated_hello(batch, id, h, &ident, b"", out),
                None => refuse(
                    out,
                    conn,
                    id,
                    ErrorCode::AuthRequired,
                    b"this server requires credentials (SCRAM-SHA-256)",
                ),
            }
        }
        Request::Hello(ref h) if auth.enabled() => {
            let mut nonce = [0u8; 18];
            fill_random(&mut nonce);
            let nonce = portswitch_auth::scram::nonce_from(&nonce);
            match auth.start(conn, addr, h, &nonce, now, channel(&security)) {
                Ok(challenge) => out.reply(
                    conn,
                    id,
                    &Reply::AuthContinue {
                        data: challenge.as_bytes(),
                    },
                ),
                Err((code, msg)) => refuse(out, conn, id, code, msg.as_bytes()),
            }
        }
        Request::Hello(ref h) if h.credentials.is_empty() && !auth.admits_anonymous(addr) => {
            refuse(
                out,
                conn,
                id,
                ErrorCode::AuthRequired,
                b"this server has a user store but no users yet: create the first from loopback",
            )
        }
        Request::Auth { data } => match auth.finish(conn, addr, data, now, channel(&security)) {
            Ok((hello, ident, server_final)) => core.handle_authenticated_hello(
                batch,
                id,
                &hello.as_hello(),
                &ident,
                server_final.as_bytes(),
                out,
            ),
            Err((code, msg)) => refuse(out, conn, id, code, msg.as_bytes()),
        },
        Request::Admin { command } => {
            let caller = core.session_user(conn).and_then(|(u, a)| Some((u?, a?)));
            let mut salt = [0u8; portswitch_auth::scram::SALT_BYTES];
            fill_random(&mut salt);
            match auth.admin(caller, addr, command, &salt) {
                Ok(AdminOutcome::Done { answer, deleted }) => {
                    if let Some(user) = deleted {
                        core.end_sessions_of(&user, now, out);
                    }
                    out.reply(
                        conn,
                        id,
                        &Reply::AdminOk {
                            result: answer.as_bytes(),
                        },
                    )
                }
                // (A group's master takes these in `feed`, where it can wait.)
                Ok(AdminOutcome::Replicate { .. }) => refuse(
                    out,
                    conn,
                    id,
                    ErrorCode::NotMaster,
                    b"users change through the group's master",
                ),
                Err((code, msg)) => refuse(out, conn, id, code, msg.as_bytes()),
            }
        }
        // A HELLO the core handles as before (no users, or credentials it refuses).
        _ => core.handle(batch, id, req, out),
    }
}

pub(super) fn security_of(conns: &slab::Slab<ConnOut>, conn: ConnId) -> crate::tls::ConnSecurity {
    conns
        .get(conn_key(conn))
        .filter(|c| c.id == conn_base(conn))
        .map(|c| c.security.clone())
        .unwrap_or_default()
}

pub(super) fn channel(s: &crate::tls::ConnSecurity) -> portswitch_auth::scram::Channel<'_> {
    match &s.exporter {
        Some(e) => portswitch_auth::scram::Channel::TlsExporter(e),
        None => portswitch_auth::scram::Channel::Plain,
    }
}

pub(super) fn addr_of(conns: &slab::Slab<ConnOut>, conn: ConnId) -> std::net::IpAddr {
    conns
        .get(conn_key(conn))
        .filter(|c| c.id == conn_base(conn))
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.addr)
}
