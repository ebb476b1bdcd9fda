//! Limits on everything a query can make the server do.
//!
//! A query is hostile input: it may come from any client. Every resource it can consume
//! is bounded here, and each bound is checked at the earliest point it can be: the source
//! length before lexing, node count and nesting while parsing, regex program size when a
//! pattern is compiled (once, at plan time), the static cost of literal-sized loops when
//! the program is compiled, and steps and memory while it runs.
//!
//! There is no wall-clock budget: evaluation never blocks, and every unit of work is
//! charged to the step counter (node evaluations, loop iterations, and long string or
//! list scans in proportion to their length), so steps bound time.

/// Largest query source accepted, in bytes. Queries are written by people or generated
/// from filters; 64 KiB is far beyond either and keeps byte offsets in a `u32`.
pub const SOURCE_BYTES_MAX: usize = 64 * 1024;

/// Most AST nodes in one query. Every literal, name, operator, call and field access is
/// a node. Bounds parser, checker and compiler work and the compiled program's size.
pub const NODES_MAX: usize = 16 * 1024;

/// Deepest expression tree accepted (parenthesised nesting, and also long operator
/// chains, which build left-deep trees). Parser, checker, compiler and evaluator recurse
/// over the tree, so this is what keeps them off the end of the stack. Measured on every
/// construct that nests (`tests/limits.rs` checks the accepted maximum of each in a
/// 2 MiB thread): an unoptimised build survives 200 levels in 2 MiB, an optimised one
/// 512, so 128 leaves a margin even in debug builds. For long disjunctions, write
/// `x in [a, b, …]` rather than `x == a || x == b || …`.
pub const DEPTH_MAX: usize = 128;

/// Hard ceiling on [`Limits::depth_max`]: a caller may lower the depth limit but not
/// raise it past this, which optimised builds survive on a 2 MiB stack with a margin of
/// two (unoptimised builds need 4 MiB at the ceiling).
pub const DEPTH_CEILING: usize = 256;

/// Largest compiled regex program, in bytes: passed to `regex::RegexBuilder::size_limit`
/// (the compiled NFA) and `dfa_size_limit` (each lazy DFA cache). `a{1000}{1000}` needs
/// far more and is refused at compile time; ordinary patterns need a few KiB.
pub const REGEX_BYTES_MAX: usize = 1 << 20;

/// Most regex literals in one program. Each may use up to [`REGEX_BYTES_MAX`] (and as
/// much again per thread for its lazy DFA), so this bounds a program's regex memory in
/// total, not only per pattern.
pub const REGEXES_MAX: usize = 16;

/// Step budget of one evaluation. A step is one node evaluated; a loop iteration charges
/// the static size of its body, and scans over long strings or lists charge one step per
/// [`SCAN_BYTES_PER_STEP`] bytes or element. A step costs a few nanoseconds, so the
/// default budget is some milliseconds of one core.
pub const STEPS_MAX: u64 = 1_000_000;

/// Bytes of strings, bytes, lists and maps one evaluation may allocate in total
/// (concatenations, `map`/`filter` results, literals built at run time, `lower`/`upper`).
pub const MEMORY_BYTES_MAX: u64 = 16 << 20;

/// How many bytes (or list elements, or map entries) of a scan cost one step.
pub const SCAN_BYTES_PER_STEP: u64 = 64;

/// Deepest nesting of values that equality descends into (lists of lists, maps of maps).
/// Values come from the caller and may be deep; comparison refuses rather than recurse
/// without bound.
pub const VALUE_DEPTH_MAX: usize = 128;

// A program without loops evaluates each node at most once, so a node limit within the
// step budget means such a program can never run out of steps: only loops need metering.
const _: () = assert!(NODES_MAX as u64 <= STEPS_MAX);
// The default depth must be one the recursive passes are known to survive.
const _: () = assert!(DEPTH_MAX <= DEPTH_CEILING);
// Spans are u32 byte offsets.
const _: () = assert!(SOURCE_BYTES_MAX <= u32::MAX as usize);

/// The limits one program is compiled and evaluated under. `Limits::default()` uses the
/// constants of this module; lower any of them for untrusted tenants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest source, in bytes (at most `u32::MAX`).
    pub source_bytes_max: usize,
    /// Most AST nodes.
    pub nodes_max: usize,
    /// Deepest expression tree; values above [`DEPTH_CEILING`] are treated as the ceiling.
    pub depth_max: usize,
    /// Largest regex program (and lazy DFA cache), in bytes.
    pub regex_bytes_max: usize,
    /// Most regex literals per program.
    pub regexes_max: usize,
    /// Step budget of one evaluation.
    pub steps_max: u64,
    /// Bytes one evaluation may allocate for the values it builds.
    pub memory_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            source_bytes_max: SOURCE_BYTES_MAX,
            nodes_max: NODES_MAX,
            depth_max: DEPTH_MAX,
            regex_bytes_max: REGEX_BYTES_MAX,
            regexes_max: REGEXES_MAX,
            steps_max: STEPS_MAX,
            memory_bytes_max: MEMORY_BYTES_MAX,
        }
    }
}

impl Limits {
    /// The depth limit actually applied: the configured one, capped at the ceiling.
    pub(crate) fn depth(&self) -> usize {
        self.depth_max.min(DEPTH_CEILING)
    }

    /// The source limit actually applied: spans are `u32`.
    pub(crate) fn source_bytes(&self) -> usize {
        self.source_bytes_max.min(u32::MAX as usize)
    }
}
