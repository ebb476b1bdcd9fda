//! One client connection: a reader task that feeds whole frames to the shared state,
//! and a writer task that writes whatever output has accumulated.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use portswitch_proto::{ErrorCode, Event, FrameBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::state::{Fed, Shared};

/// Read buffers start small so that idle connections cost little (a million idle
/// sessions is a product figure), grow while reads keep filling them and to hold the
/// largest frame, and shrink back after a burst.
const READ_BUF_BYTES_INITIAL: usize = 512;
/// Growth step cap for reads that fill the buffer (frames larger than this still get
/// room for the whole frame, from its declared length).
const READ_BUF_BYTES_STEP_MAX: usize = 64 << 10;
const READ_BUF_BYTES_KEEP: usize = 256 << 10;
/// Reads smaller than this (a PING, a KEEPALIVE) mark a connection as idle: it gives
/// its read buffer back until more comes.
const READ_BYTES_IDLE: usize = 64;
/// Write buffers larger than this are not kept for reuse once written.
const WRITE_BUF_BYTES_KEEP: usize = 1 << 20;
/// Nor are write buffers this small: reallocating them is cheap next to the write
/// itself, and an idle connection then holds no output buffer at all.
const WRITE_BUF_BYTES_DROP_BELOW: usize = 16 << 10;

pub(crate) fn spawn<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    security: crate::tls::ConnSecurity,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let Some((conn, notify)) = shared.open(peer.ip(), security) else {
        tokio::spawn(refuse(stream));
        return;
    };
    tracing::debug!(%peer, conn, "connection opened");
    let (mut rd, mut wr) = tokio::io::split(stream);

    let stall = std::time::Duration::from_millis(shared.config().write_stall_ms_max);
    let writer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                notify.notified().await;
                let Some(close) = shared.take_output(conn, &mut buf) else {
                    break;
                };
                if !buf.is_empty() && !write_or_stall(&mut wr, &buf, stall).await {
                    break;
                }
                if close {
                    break;
                }
                if buf.capacity() > WRITE_BUF_BYTES_KEEP
                    || buf.capacity() < WRITE_BUF_BYTES_DROP_BELOW
                {
                    buf = BytesMut::new();
                }
            }
            let _ = wr.shutdown().await;
        })
    };

    tokio::spawn(async move {
        let frame_max = shared.config().core.frame_bytes_max as usize;
        let mut buf = BytesMut::with_capacity(READ_BUF_BYTES_INITIAL);
        // How much room the next read gets: doubles while reads fill the buffer
        // (a busy, pipelining client), back to the minimum when one does not.
        let mut step = READ_BUF_BYTES_INITIAL;
        let mut last_read = 0usize;
        let mut writer = writer;
        let mut writer_finished = false;
        let mut goaway_queued = false;
        // Messages of the first buffered frame already handled (see `Fed::Suspended`).
        let mut skip = 0;
        // Set after a suspension ends: feed what is buffered before reading more.
        let mut resume = false;
        // Until a HELLO succeeds on it, the connection has login_timeout_ms.
        let login_by = tokio::time::Instant::now()
            + std::time::Duration::from_millis(shared.config().login_timeout_ms);
        let mut logged_in = false;
        loop {
            if !std::mem::take(&mut resume) {
                // An idle connection (nothing buffered, last read a heartbeat's size)
                // waits with no buffer of its own; the read then allocates a small chunk.
                let idle = buf.is_empty() && last_read < READ_BYTES_IDLE;
                if !idle && buf.capacity() - buf.len() < step {
                    // Room for at least the rest of the frame being read (bounded: the
                    // header's length was checked against frame_max when it arrived).
                    let want = declared_total(&buf).unwrap_or(0).min(4 + frame_max);
                    buf.reserve(want.saturating_sub(buf.len()).max(step));
                }
                let room = buf.capacity() - buf.len();
                tokio::select! {
                    read = rd.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            last_read = n;
                            step = if n >= room {
                                (step * 2).min(READ_BUF_BYTES_STEP_MAX)
                            } else {
                                READ_BUF_BYTES_INITIAL
                            };
                        }
                    },
                    // The writer ends after writing a GOAWAY (expiry, slow consumer,
                    // shutdown) or when the peer stops accepting bytes.
                    _ = &mut writer => {
                        writer_finished = true;
                        break;
                    }
                    _ = tokio::time::sleep_until(login_by), if !logged_in => {
                        shared.login_timed_out(conn);
                        goaway_queued = true;
                        break;
                    }
                }
            }
            let fed = shared.feed(conn, &buf, skip);
            if !logged_in {
                logged_in = shared.logged_in(conn);
            }
            match fed {
                Fed::Consumed(n) => {
                    buf.advance(n);
                    skip = 0;
                }
                Fed::Close => {
                    goaway_queued = true;
                    break;
                }
                Fed::Suspended {
                    consumed,
                    skip: handled,
                    answered,
                } => {
                    // Nothing more is read until the deferred reply is queued, so
                    // replies stay in request order (the peer's writes back up).
                    buf.advance(consumed);
                    skip = handled;
                    tokio::select! {
                        _ = answered => {}
                        _ = &mut writer => {
                            writer_finished = true;
                            break;
                        }
                    }
                    resume = true;
                    continue;
                }
            }
            if buf.is_empty()
                && (buf.capacity() > READ_BUF_BYTES_KEEP || last_read < READ_BYTES_IDLE)
            {
                buf = BytesMut::new();
            }
        }
        if goaway_queued && !writer_finished {
            // Give the GOAWAY a moment to reach a peer that is still reading.
            writer_finished = tokio::time::timeout(GOAWAY_FLUSH, &mut writer)
                .await
                .is_ok();
        }
        // Report the disconnect at once: a session that ends on disconnect has its
        // ports released now, not after some grace period.
        shared.closed(conn);
        if !writer_finished {
            writer.abort();
        }
        tracing::debug!(conn, "connection closed");
    });
}

/// Writes all of `buf`; false if the connection failed or a single write made no
/// progress for `stall` (a peer that stopped reading).
async fn write_or_stall<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &[u8],
    stall: std::time::Duration,
) -> bool {
    let mut done = 0;
    while done < buf.len() {
        match tokio::time::timeout(stall, wr.write(&buf[done..])).await {
            Ok(Ok(n)) if n > 0 => done += n,
            _ => {
                tracing::debug!("write failed or stalled; closing the connection");
                return false;
            }
        }
    }
    true
}

/// How long a connection being closed with a GOAWAY gets to take it.
const GOAWAY_FLUSH: std::time::Duration = std::time::Duration::from_millis(200);

fn declared_total(buf: &[u8]) -> Option<usize> {
    (buf.len() >= 4).then(|| 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize)
}

/// Tells a connection over the cap why it is refused, then closes it.
async fn refuse<S: AsyncWrite>(stream: S) {
    let mut stream = std::pin::pin!(stream);
    let mut out = FrameBuf::new(1 << 16, 1);
    out.push_event(&Event::GoAway {
        code: ErrorCode::ConnectionsMax,
        message: b"server holds connections_max connections",
    });
    let mut bytes = BytesMut::new();
    out.take_into(&mut bytes);
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}
