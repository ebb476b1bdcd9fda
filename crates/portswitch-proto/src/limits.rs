//! Protocol-wide limits. A server may configure lower values (it announces its own in
//! `HELLO_OK`); it never accepts more than these. Every peer-controlled length is checked
//! against one of these *before* anything is allocated for it.

/// Protocol version spoken by this crate. `HELLO` negotiates within `[min, max]`.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bytes of the frame header: a big-endian `u32` body length.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Largest frame body, in bytes. One megabyte holds thousands of small commands (a
/// REGISTER of a 24-byte name is 42 bytes) while bounding what one read may buffer per
/// connection.
pub const FRAME_BYTES_MAX: usize = 1 << 20;

/// Largest frame a client sends on a connection before its first `HELLO_OK` there,
/// and the least a server accepts before then (a server caps strangers' frames at its
/// `frame_bytes_before_login_max`, never below this). Holds any HELLO or AUTH, and a
/// few hundred HELLOs of a multiplexing client opening sessions at once.
pub const FRAME_BYTES_BEFORE_LOGIN: usize = 16 << 10;

/// Bytes of a message header: opcode `u8`, request id `u32`, body length `u32`.
pub const MESSAGE_HEADER_BYTES: usize = 9;

/// Most messages in one frame. Bounds the work one frame can demand of the server
/// before it answers anything.
pub const COMMANDS_PER_FRAME_MAX: usize = 16_384;

/// Longest port name. Names are opaque bytes; 256 covers any path-like naming scheme.
pub const PORT_NAME_BYTES_MAX: usize = 256;

/// Longest node name a session may announce.
pub const NODE_NAME_BYTES_MAX: usize = 128;

/// Largest value attached to a port (an address, a small JSON blob). Kept small on
/// purpose: the value lives in the master's memory for as long as the port is owned.
pub const VALUE_BYTES_MAX: usize = 4_096;

/// Largest payload of a SEND or BROADCAST.
pub const PAYLOAD_BYTES_MAX: usize = 65_536;

/// Largest credentials blob in HELLO (reserved for authentication).
pub const CREDENTIALS_BYTES_MAX: usize = 4_096;

/// Largest authentication message (AUTH data, AUTH_CONTINUE data, HELLO_OK auth).
pub const AUTH_DATA_BYTES_MAX: usize = 1_024;

/// Largest ADMIN command or ADMIN_OK result (a user list, say).
pub const ADMIN_BYTES_MAX: usize = 256 << 10;

/// Longest human-readable error message.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1_024;

/// Longest address (`HOST:PORT`) an ERROR names as the master.
pub const ADDR_BYTES_MAX: usize = 256;

/// Most entries one LIST page may ask for.
pub const LIST_LIMIT_MAX: u32 = 4_096;

/// Longest filter expression a LIST_WHERE or a filtered prefix WATCH may carry (bytes
/// of `portswitch-query` source). A filter selects ports by their fields; 4 KiB is far
/// beyond any written by hand, and keeps what a server compiles per request small.
pub const QUERY_BYTES_MAX: usize = 4_096;

/// Most name/value pairs in a STATS reply.
pub const STATS_ENTRIES_MAX: usize = 256;

/// Longest stat name.
pub const STAT_NAME_BYTES_MAX: usize = 64;

/// Encoded size of the largest client message (SEND with the longest name and payload).
pub const REQUEST_BYTES_MAX: usize =
    MESSAGE_HEADER_BYTES + 2 + PORT_NAME_BYTES_MAX + 4 + PAYLOAD_BYTES_MAX;

/// Encoded size of the largest event (MESSAGE with the longest name and payload).
pub const EVENT_BYTES_MAX: usize =
    MESSAGE_HEADER_BYTES + 8 + 2 + PORT_NAME_BYTES_MAX + 4 + PAYLOAD_BYTES_MAX;

/// Encoded size of one LIST entry at its largest.
pub const PAGE_ENTRY_BYTES_MAX: usize =
    2 + PORT_NAME_BYTES_MAX + 8 + 8 + 2 + NODE_NAME_BYTES_MAX + 2 + VALUE_BYTES_MAX;

/// Encoded size of the largest LIST_WHERE (the longest prefix and filter).
pub const LIST_WHERE_BYTES_MAX: usize =
    MESSAGE_HEADER_BYTES + 2 + PORT_NAME_BYTES_MAX + 8 + 4 + 2 + QUERY_BYTES_MAX;

// Any single message must fit in a frame, or a valid request could never be sent and a
// valid event never delivered.
const _: () = assert!(REQUEST_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(EVENT_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(MESSAGE_HEADER_BYTES + 4 + ADMIN_BYTES_MAX <= FRAME_BYTES_MAX);
// A LIST page always holds at least one entry of any size (the server trims pages by
// bytes so that a page of LIST_LIMIT_MAX large entries still fits one frame).
const _: () = assert!(MESSAGE_HEADER_BYTES + 12 + PAGE_ENTRY_BYTES_MAX <= FRAME_BYTES_MAX);
// Any HELLO (credentials and node name at their largest) and any AUTH fits a frame
// sent before login.
const _: () = assert!(
    MESSAGE_HEADER_BYTES + 64 + NODE_NAME_BYTES_MAX + CREDENTIALS_BYTES_MAX
        <= FRAME_BYTES_BEFORE_LOGIN
);
const _: () = assert!(MESSAGE_HEADER_BYTES + 4 + AUTH_DATA_BYTES_MAX <= FRAME_BYTES_BEFORE_LOGIN);
// Name lengths travel as u16.
const _: () = assert!(PORT_NAME_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(VALUE_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(CREDENTIALS_BYTES_MAX <= u16::MAX as usize);
// Filters travel as b16, and a filtered request (even before login) fits any frame.
const _: () = assert!(QUERY_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(LIST_WHERE_BYTES_MAX <= FRAME_BYTES_BEFORE_LOGIN);
