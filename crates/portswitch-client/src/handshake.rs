//! Opening a session — HELLO, and with credentials the SCRAM-SHA-256 round trip — as
//! a state machine without I/O: the driver sends what it is told to, hands back each
//! answer, and gets the session's HELLO_OK or a typed error. Used for new sessions and
//! resumes, on a connection of their own or on a channel of a shared one.

use portswitch_auth::scram;
use portswitch_proto::limits::PROTOCOL_VERSION;
use portswitch_proto::{Hello, HelloOk, Reply};

use crate::types::{Error, Result};
use crate::ClientOptions;

/// The mechanism prefix of HELLO credentials.
const SCRAM_MECHANISM: &str = "SCRAM-SHA-256 ";

enum State {
    /// HELLO sent; with credentials, the exchange begun.
    Hello(Option<scram::ClientExchange>),
    /// AUTH sent; the server's signature is still to be checked.
    Auth(scram::ClientAwaitingServer),
    Done,
}

/// One opening of a session.
pub(crate) struct Handshake {
    state: State,
    /// The connection's `tls-exporter` value (channel binding), over TLS.
    exporter: Option<[u8; 32]>,
    /// HELLO's credentials: the mechanism and the client-first-message.
    credentials: Vec<u8>,
}

/// What to do after an answer.
pub(crate) enum Next {
    /// Send AUTH with this client-final-message.
    Auth(String),
    /// The session is open (or resumed).
    Done(HelloOk<'static>),
}

impl Handshake {
    /// Begins: `random` seeds the SCRAM nonce (from the OS, by the driver).
    pub fn start(opts: &ClientOptions, exporter: Option<[u8; 32]>, random: &[u8; 18]) -> Handshake {
        let (exchange, credentials) = match &opts.credentials {
            None => (None, Vec::new()),
            Some((user, password)) => {
                let nonce = scram::nonce_from(random);
                let (exchange, first) =
                    scram::ClientExchange::start(user, password, &nonce, binding(&exporter));
                (
                    Some(exchange),
                    format!("{SCRAM_MECHANISM}{first}").into_bytes(),
                )
            }
        };
        Handshake {
            state: State::Hello(exchange),
            exporter,
            credentials,
        }
    }

    /// The HELLO to send first.
    pub fn hello<'a>(
        &'a self,
        opts: &'a ClientOptions,
        lease_ms: u32,
        resume: Option<(u64, u64)>,
    ) -> Hello<'a> {
        let (resume_session, resume_secret) = resume.unwrap_or((0, 0));
        Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            features: 0,
            lease_ms,
            end_on_disconnect: opts.end_on_disconnect,
            node_name: opts.node_name.as_bytes(),
            credentials: &self.credentials,
            resume_session,
            resume_secret,
        }
    }

    /// The server's answer to the last message sent.
    pub fn on_reply(&mut self, reply: &Reply<'_>) -> Result<Next> {
        match (std::mem::replace(&mut self.state, State::Done), reply) {
            (State::Hello(Some(exchange)), Reply::AuthContinue { data }) => {
                let challenge = std::str::from_utf8(data)
                    .map_err(|_| Error::Protocol("challenge is not UTF-8".into()))?;
                let (awaiting, client_final) = exchange
                    .respond(challenge, binding(&self.exporter))
                    .map_err(|e| Error::Protocol(format!("authentication: {e}")))?;
                self.state = State::Auth(awaiting);
                Ok(Next::Auth(client_final))
            }
            (State::Hello(None), Reply::HelloOk(h)) => Ok(Next::Done(HelloOk { auth: &[], ..*h })),
            (State::Hello(Some(_)), Reply::HelloOk(_)) => Err(Error::Protocol(
                "the server accepted the session without authenticating".into(),
            )),
            (State::Auth(awaiting), Reply::HelloOk(h)) => {
                // Mutual authentication: only a server holding our verifier can sign.
                awaiting
                    .verify(std::str::from_utf8(h.auth).unwrap_or(""))
                    .map_err(|e| {
                        Error::Protocol(format!("the server failed to authenticate: {e}"))
                    })?;
                Ok(Next::Done(HelloOk { auth: &[], ..*h }))
            }
            (
                _,
                Reply::Error {
                    code,
                    message,
                    retry_ms,
                    master,
                },
            ) => Err(Error::of_reply(*code, message, *retry_ms, master)),
            (_, other) => Err(Error::Protocol(format!(
                "unexpected handshake answer {other:?}"
            ))),
        }
    }
}

fn binding(exporter: &Option<[u8; 32]>) -> scram::Channel<'_> {
    match exporter {
        Some(e) => scram::Channel::TlsExporter(e),
        None => scram::Channel::Plain,
    }
}

/// Random bytes for a SCRAM nonce, from the OS.
pub(crate) fn nonce_seed() -> Result<[u8; 18]> {
    let mut random = [0u8; 18];
    getrandom::getrandom(&mut random)
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
    Ok(random)
}
