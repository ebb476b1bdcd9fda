//! One client connection: a reader task that feeds whole frames to the shared state,
//! and a writer task that writes whatever output has accumulated.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use portswitch_proto::{ErrorCode, Event, FrameBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::state::{Fed, Shared};

/// Read buffers start small so idle connections cost little, grow to hold the largest
/// frame, and shrink back after a burst.
const READ_BUF_BYTES_INITIAL: usize = 4 << 10;
const READ_BUF_BYTES_KEEP: usize = 256 << 10;
/// Write buffers larger than this are not kept for reuse once written.
const WRITE_BUF_BYTES_KEEP: usize = 1 << 20;

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

    let writer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                notify.notified().await;
                let Some(close) = shared.take_output(conn, &mut buf) else {
                    break;
                };
                if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
                    break;
                }
                if close {
                    break;
                }
                if buf.capacity() > WRITE_BUF_BYTES_KEEP {
                    buf = BytesMut::new();
                }
            }
            let _ = wr.shutdown().await;
        })
    };

    tokio::spawn(async move {
        let frame_max = shared.config().core.frame_bytes_max as usize;
        let mut buf = BytesMut::with_capacity(READ_BUF_BYTES_INITIAL);
        let mut writer = writer;
        let mut writer_finished = false;
        let mut goaway_queued = false;
        loop {
            if buf.capacity() - buf.len() < READ_BUF_BYTES_INITIAL {
                // Room for at least the rest of the frame being read (bounded: the
                // header's length was checked against frame_max when it arrived).
                let want = declared_total(&buf).unwrap_or(0).min(4 + frame_max);
                buf.reserve(want.saturating_sub(buf.len()).max(READ_BUF_BYTES_INITIAL));
            }
            tokio::select! {
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                // The writer ends after writing a GOAWAY (expiry, slow consumer,
                // shutdown) or when the peer stops accepting bytes.
                _ = &mut writer => {
                    writer_finished = true;
                    break;
                }
            }
            match shared.feed(conn, &buf) {
                Fed::Consumed(n) => buf.advance(n),
                Fed::Close => {
                    goaway_queued = true;
                    break;
                }
            }
            if buf.is_empty() && buf.capacity() > READ_BUF_BYTES_KEEP {
                buf = BytesMut::with_capacity(READ_BUF_BYTES_INITIAL);
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
