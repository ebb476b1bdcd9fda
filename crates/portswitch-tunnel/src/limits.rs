//! Every limit of the tunnel, named once. Unit and qualifier last. Relations between
//! them are checked at compile time below, with the reason.

/// Bytes of a record's ciphertext body (the length field on the wire is a `u16`).
pub const RECORD_BODY_BYTES_MAX: usize = u16::MAX as usize;
/// AEAD tag bytes (AES-256-GCM and ChaCha20-Poly1305 alike).
pub const TAG_BYTES: usize = 16;
/// Bytes of a record header on the wire: a sealed `u16` body length.
pub const RECORD_HEADER_BYTES: usize = 2 + TAG_BYTES;
/// Plaintext bytes of a record: a `u16` content length, frames, padding.
pub const RECORD_PLAIN_BYTES_MAX: usize = RECORD_BODY_BYTES_MAX - TAG_BYTES;
/// Bytes of frames one record carries (the rest of the plaintext is padding).
pub const RECORD_CONTENT_BYTES_MAX: usize = RECORD_PLAIN_BYTES_MAX - 2;
/// A record whose frames are shorter than a target drawn uniformly from
/// `RECORD_PAD_MIN_BYTES..=RECORD_PAD_MAX_BYTES` is padded to that target, so small
/// messages (keystrokes, API calls, acknowledgements) all look alike on the wire.
pub const RECORD_PAD_MIN_BYTES: usize = 512;
pub const RECORD_PAD_MAX_BYTES: usize = 1400;
/// Longer records get this many random padding bytes at most on top of their frames.
pub const RECORD_PAD_JITTER_MAX_BYTES: usize = 255;

/// Raw (carried) bytes a stream reads from its socket into one DATA frame. Two full
/// frames fit in one record.
pub const STREAM_CHUNK_BYTES_MAX: usize = 32 * 1024 - 128;
/// Bytes of a DATA frame's header (type, stream, seq, flags, raw length, length).
pub const DATA_HEADER_BYTES: usize = 1 + 4 + 8 + 1 + 4 + 4;
const _: () = assert!(2 * (STREAM_CHUNK_BYTES_MAX + DATA_HEADER_BYTES) <= RECORD_CONTENT_BYTES_MAX);
/// Bytes of a frame's payload on the wire (a chunk, compressed or not).
pub const FRAME_PAYLOAD_BYTES_MAX: usize = STREAM_CHUNK_BYTES_MAX;
/// Bytes of an OPEN frame's target ("host:port"): a DNS name is at most 253.
pub const TARGET_BYTES_MAX: usize = 300;

/// Per-stream receive window at first, carried bytes: what one stream may have in
/// flight and buffered at the far end. One stalled reader holds at most this much.
pub const STREAM_WINDOW_BYTES_DEFAULT: u64 = 1 << 20;
/// What auto-tuning raises the window of a stream whose reader keeps up to, by
/// doubling (a gigabyte a second over a loaded 2-core machine's round trip needs
/// 4 MiB in flight). A reader that stalls after its window grew holds at most this.
pub const STREAM_WINDOW_AUTO_MAX_BYTES_DEFAULT: u64 = 4 << 20;
pub const STREAM_WINDOW_BYTES_MIN: u64 = STREAM_CHUNK_BYTES_MAX as u64;
pub const STREAM_WINDOW_BYTES_MAX: u64 = 16 << 20;
/// Per-session receive window over all streams, carried bytes.
pub const SESSION_WINDOW_BYTES_DEFAULT: u64 = 32 << 20;
pub const SESSION_WINDOW_BYTES_MAX: u64 = 1 << 30;
// A session window below one stream window would let one stream stall the session.
const _: () = assert!(SESSION_WINDOW_BYTES_DEFAULT >= 4 * STREAM_WINDOW_BYTES_DEFAULT);
/// Frames a stream may hold out of order, waiting for a gap to fill: frames may be
/// empty (FIN), so bytes alone do not bound the count.
pub const REORDER_FRAMES_MAX: u64 = 4096;
/// Streams open at once in a session.
pub const STREAMS_PER_SESSION_MAX: usize = 1024;
/// Closed stream ids remembered to drop late retransmissions of their frames.
pub const CLOSED_STREAM_IDS_MAX: usize = 65_536;

/// Pool connections per session.
pub const POOL_CONNECTIONS_DEFAULT: usize = 4;
pub const POOL_CONNECTIONS_MAX: usize = 16;
/// Frame bytes sent on one pool connection and not yet acknowledged (the
/// per-connection window): what is resent elsewhere when it dies.
pub const CONN_UNACKED_BYTES_MAX: usize = 8 << 20;
/// Records received on a connection and not yet acknowledged, past which an
/// acknowledgement goes out alone at once; below it, it waits up to
/// `ACK_DELAY_MS` for a record that goes out anyway.
pub const ACK_RECORDS_MAX: u64 = 16;
pub const ACK_DELAY_MS: u64 = 20;
// The sender must never stall on its unacknowledged window waiting for a delayed
// acknowledgement: the records that trigger one immediately fit in it.
const _: () = assert!(ACK_RECORDS_MAX as usize * RECORD_BODY_BYTES_MAX < CONN_UNACKED_BYTES_MAX);
/// A new stream's OPEN waits this long for the application's first bytes, so both
/// travel in one record (protocols where the server speaks first pay it once).
pub const OPEN_HOLD_MS: u64 = 2;
/// Sessions a server holds at once.
pub const SESSIONS_MAX: usize = 1024;
/// A session whose pool connections are all gone waits this long for one to come back
/// before its streams are reset.
pub const SESSION_ORPHAN_GRACE_MS: u64 = 30_000;

/// The whole handshake (both hellos) must complete within this.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// A hello's timestamp may differ from the server's clock by this much; replayed hellos
/// are remembered for twice this long.
pub const HANDSHAKE_CLOCK_SKEW_S: u64 = 120;
/// Hellos remembered against replay. When full of live entries, new hellos are refused
/// (they cannot be checked).
pub const REPLAY_CACHE_ENTRIES_MAX: usize = 200_000;
/// Random padding in a hello, bytes (before encoding).
pub const HELLO_PAD_MAX_BYTES: usize = 600;
/// Bytes of a hello body (sealed), so a peer-declared length is bounded.
pub const HELLO_BODY_BYTES_MAX: usize = 2048;
/// A server that rejects a connection keeps reading and discarding until a limit drawn
/// from this range, or until a timeout drawn from the next, then closes: like a
/// service that never answers.
pub const SILENT_DRAIN_BYTES_MIN: u64 = 4 * 1024;
pub const SILENT_DRAIN_BYTES_MAX: u64 = 64 * 1024;
pub const SILENT_DRAIN_MS_MIN: u64 = 20_000;
pub const SILENT_DRAIN_MS_MAX: u64 = 60_000;

/// A pool connection with nothing received for this long is dead (keepalives are sent
/// at a third of it).
pub const CONN_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Dial attempts per pool connection are spaced by this backoff, doubled up to the max.
pub const REDIAL_BACKOFF_MS_MIN: u64 = 50;
pub const REDIAL_BACKOFF_MS_MAX: u64 = 2_000;
