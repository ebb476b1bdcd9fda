//! Errors: typed kinds, byte-offset spans, and rendering as `line:column` with a caret
//! excerpt of the source.
//!
//! Errors are created where they are detected with only a kind and a span (cheap: the
//! evaluator must not format anything on its way out). The public entry points then
//! attach a [`Location`] computed from the source, which is what `Display` prints.

use std::fmt;

/// A byte range `start..end` in the query source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    /// First byte.
    pub start: u32,
    /// One past the last byte.
    pub end: u32,
}

impl Span {
    /// The span `start..end`.
    pub const fn new(start: u32, end: u32) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// As a `usize` range, for slicing the source.
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// Where a span is in the source, ready to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// The source line (or a window of it around the column, if the line is long).
    pub excerpt: String,
    /// Characters of `excerpt` before the caret.
    pub caret_offset: u32,
    /// How many carets to print (at least one).
    pub caret_len: u32,
}

/// Longest excerpt printed; longer lines are windowed around the error.
const EXCERPT_CHARS_MAX: usize = 80;

impl Location {
    /// Locates `span` in `source`. Never panics, whatever the span.
    pub fn find(source: &str, span: Span) -> Location {
        let start = floor_char_boundary(source, span.start as usize);
        let end = floor_char_boundary(source, (span.end as usize).max(start));
        let before = &source[..start];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..]
            .find('\n')
            .map_or(source.len(), |i| start + i);
        let line_text = source[line_start..line_end].trim_end_matches('\r');
        let line = before.matches('\n').count() + 1;
        let column = source[line_start..start].chars().count();
        let span_chars = source[start..end.min(line_end)].chars().count().max(1);

        // Window long lines so that the caret stays on screen.
        let line_chars = line_text.chars().count();
        let (skip, ellipsis_front) = if line_chars <= EXCERPT_CHARS_MAX {
            (0, false)
        } else {
            let skip = column
                .saturating_sub(EXCERPT_CHARS_MAX / 2)
                .min(line_chars - EXCERPT_CHARS_MAX);
            (skip, skip > 0)
        };
        let mut excerpt = String::new();
        if ellipsis_front {
            excerpt.push('…');
        }
        excerpt.extend(line_text.chars().skip(skip).take(EXCERPT_CHARS_MAX));
        if skip + EXCERPT_CHARS_MAX < line_chars {
            excerpt.push('…');
        }
        let caret_offset = column - skip + usize::from(ellipsis_front);
        let caret_len = span_chars.min(EXCERPT_CHARS_MAX.saturating_sub(column - skip).max(1));
        Location {
            line: saturate(line),
            column: saturate(column + 1),
            excerpt,
            caret_offset: saturate(caret_offset),
            caret_len: saturate(caret_len),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  | {}", self.excerpt)?;
        write!(
            f,
            "  | {}{}",
            " ".repeat(self.caret_offset as usize),
            "^".repeat(self.caret_len as usize)
        )
    }
}

/// What went wrong while lexing, parsing, checking or compiling a query.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CompileErrorKind {
    /// The source is longer than [`crate::Limits::source_bytes_max`].
    #[error("query is {len} bytes, more than the limit of {max}")]
    SourceTooLong {
        /// Source length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More AST nodes than [`crate::Limits::nodes_max`].
    #[error("query has more than {max} nodes")]
    TooManyNodes {
        /// The limit.
        max: usize,
    },
    /// Nesting deeper than [`crate::Limits::depth_max`].
    #[error("expression nested more than {max} levels deep")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// A character that starts no token.
    #[error("unexpected character {0:?}")]
    UnexpectedChar(char),
    /// A string or bytes literal without its closing quote.
    #[error("unterminated string literal")]
    UnterminatedString,
    /// A bad escape sequence in a string or bytes literal.
    #[error("invalid escape sequence: {0}")]
    InvalidEscape(String),
    /// A malformed or out-of-range number literal.
    #[error("invalid number literal: {0}")]
    InvalidNumber(String),
    /// A token where it does not belong.
    #[error("expected {expected}, found {found}")]
    Unexpected {
        /// What the grammar allowed here.
        expected: String,
        /// What was there.
        found: String,
    },
    /// A macro (`all`, `exists`, `map`, `filter`, `has`) used with the wrong shape.
    #[error("{0}")]
    BadMacro(String),
    /// A name that is neither declared in the schema nor a loop variable, in a schema that
    /// allows only declared names.
    #[error("undeclared variable `{0}`")]
    UndeclaredVariable(String),
    /// A function name the language does not have.
    #[error("unknown function `{0}`")]
    UnknownFunction(String),
    /// A known function called with the wrong number of arguments.
    #[error("`{name}` takes {expected} argument(s), found {found}")]
    WrongArity {
        /// Function name.
        name: String,
        /// Arguments it takes (counting the receiver of a method call).
        expected: usize,
        /// Arguments given.
        found: usize,
    },
    /// An ill-typed expression.
    #[error("type error: {0}")]
    Type(String),
    /// `matches` with a pattern that is not a string literal. Patterns are compiled once,
    /// at plan time, never during evaluation, so they must be known when compiling.
    #[error("the pattern of `matches` must be a string literal")]
    NonLiteralPattern,
    /// A regex that does not parse.
    #[error("invalid regex: {0}")]
    InvalidRegex(String),
    /// A regex whose compiled program exceeds [`crate::Limits::regex_bytes_max`].
    #[error("regex program exceeds the limit of {max} bytes")]
    RegexTooBig {
        /// The limit.
        max: usize,
    },
    /// More regex literals than [`crate::Limits::regexes_max`].
    #[error("more than {max} regexes in one query")]
    TooManyRegexes {
        /// The limit.
        max: usize,
    },
    /// A literal argument that can never convert (`timestamp("yesterday")`).
    #[error("invalid literal: {0}")]
    InvalidLiteral(String),
    /// A statement (SELECT …) that is malformed or means nothing: the message says why.
    #[error("{0}")]
    Statement(String),
    /// FROM names a source the catalog does not have.
    #[error("unknown source `{0}`")]
    UnknownSource(String),
    /// Two FROM items with the same alias.
    #[error("alias `{0}` is used twice")]
    DuplicateAlias(String),
    /// A SELECT, HAVING or ORDER BY expression of a grouped query that reads a row
    /// outside an aggregate and is not a GROUP BY expression.
    #[error("`{0}` must appear in GROUP BY or inside an aggregate")]
    NotGrouped(String),
    /// An aggregate where none may be (WHERE, GROUP BY, ON, inside another aggregate).
    #[error("aggregate `{0}` is not allowed here")]
    MisplacedAggregate(String),
    /// Virtual fields that refer to each other without end, or deeper than the limit.
    #[error("virtual field `{0}` refers to itself or nests too deeply")]
    VirtualCycle(String),
    /// The worst case of loops over literal lists exceeds the step budget.
    #[error("query may take {estimate} steps, more than the limit of {max}")]
    CostTooHigh {
        /// The static estimate.
        estimate: u64,
        /// [`crate::Limits::steps_max`].
        max: u64,
    },
}

/// A query that cannot be compiled, with where in the source. Boxed: the parser,
/// checker and compiler recurse, and a small `Result` keeps their frames small.
#[derive(Clone, Debug, PartialEq)]
pub struct CompileError(Box<CompileErrorInner>);

#[derive(Clone, Debug, PartialEq)]
struct CompileErrorInner {
    kind: CompileErrorKind,
    span: Span,
    location: Option<Location>,
}

impl CompileError {
    #[cold]
    pub(crate) fn new(kind: CompileErrorKind, span: Span) -> CompileError {
        CompileError(Box::new(CompileErrorInner {
            kind,
            span,
            location: None,
        }))
    }

    pub(crate) fn locate(mut self, source: &str) -> CompileError {
        self.0.location = Some(Location::find(source, self.0.span));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &CompileErrorKind {
        &self.0.kind
    }

    /// Where, as byte offsets into the source.
    pub fn span(&self) -> Span {
        self.0.span
    }

    /// Where, as line and column with an excerpt (present on every error returned by the
    /// public API).
    pub fn location(&self) -> Option<&Location> {
        self.0.location.as_ref()
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_positioned(f, &self.0.kind, self.0.span, self.0.location.as_ref())
    }
}

impl std::error::Error for CompileError {}

fn write_positioned(
    f: &mut fmt::Formatter<'_>,
    kind: &dyn fmt::Display,
    span: Span,
    location: Option<&Location>,
) -> fmt::Result {
    match location {
        Some(loc) => write!(f, "{}:{}: {kind}\n{loc}", loc.line, loc.column),
        None => write!(f, "at byte {}: {kind}", span.start),
    }
}

/// Which budget an evaluation ran out of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cost {
    /// [`crate::Limits::steps_max`].
    Steps,
    /// [`crate::Limits::memory_bytes_max`].
    Memory,
    /// [`crate::limits::VALUE_DEPTH_MAX`]: a value nested too deeply to compare.
    ValueDepth,
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cost::Steps => "step",
            Cost::Memory => "memory",
            Cost::ValueDepth => "value depth",
        })
    }
}

/// What went wrong while evaluating.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EvalErrorKind {
    /// A map has no such key (`m.k`, `m["k"]`).
    #[error("no such key `{0}`")]
    NoSuchKey(String),
    /// A list index outside the list.
    #[error("index {index} out of range for a list of {len}")]
    IndexOutOfRange {
        /// The index.
        index: i64,
        /// The list's length.
        len: usize,
    },
    /// A value of the wrong type where the checker could not know (a `dyn` value, or
    /// bindings that do not match the schema).
    #[error("expected {expected}, found {found}")]
    TypeMismatch {
        /// What the operation needs.
        expected: &'static str,
        /// What it got.
        found: &'static str,
    },
    /// An operator or function applied to operand types it has no overload for.
    #[error("no overload of {operator} for ({})", operands.join(", "))]
    NoOverload {
        /// Operator or function name.
        operator: &'static str,
        /// Operand type names.
        operands: Vec<&'static str>,
    },
    /// Integer, time or duration arithmetic overflowed.
    #[error("arithmetic overflow")]
    Overflow,
    /// Integer division or remainder by zero.
    #[error("division by zero")]
    DivisionByZero,
    /// A budget of [`crate::Limits`] was exhausted.
    #[error("{0} budget exceeded")]
    CostExceeded(Cost),
    /// A variable the program uses was not set in the bindings.
    #[error("variable `{0}` is not bound")]
    Unbound(String),
    /// A conversion or parse of a run-time value failed (`int("x")`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A map literal built the same key twice.
    #[error("duplicate map key `{0}`")]
    DuplicateKey(String),
    /// Bindings made by another program.
    #[error("bindings belong to another program")]
    ForeignBindings,
}

/// A failed evaluation, with where in the source. Boxed so that a `Result` carrying it
/// stays one word wider than its `Ok` value on the evaluator's hot path.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalError(Box<EvalErrorInner>);

#[derive(Clone, Debug, PartialEq)]
struct EvalErrorInner {
    kind: EvalErrorKind,
    span: Span,
    location: Option<Location>,
}

impl EvalError {
    #[cold]
    pub(crate) fn new(kind: EvalErrorKind, span: Span) -> EvalError {
        EvalError(Box::new(EvalErrorInner {
            kind,
            span,
            location: None,
        }))
    }

    pub(crate) fn locate(mut self, source: &str) -> EvalError {
        self.0.location = Some(Location::find(source, self.0.span));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &EvalErrorKind {
        &self.0.kind
    }

    /// Where, as byte offsets into the source.
    pub fn span(&self) -> Span {
        self.0.span
    }

    /// Where, as line and column with an excerpt.
    pub fn location(&self) -> Option<&Location> {
        self.0.location.as_ref()
    }
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_positioned(f, &self.0.kind, self.0.span, self.0.location.as_ref())
    }
}

impl std::error::Error for EvalError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_column_and_caret() {
        let src = "a &&\n  b + 1";
        let loc = Location::find(src, Span::new(7, 12));
        assert_eq!((loc.line, loc.column), (2, 3));
        assert_eq!(loc.to_string(), "  |   b + 1\n  |   ^^^^^");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let src = "\"äöü\" + 1";
        let loc = Location::find(src, Span::new(9, 10));
        assert_eq!(loc.column, 7);
    }

    #[test]
    fn odd_spans_never_panic() {
        for (s, e) in [(0, 0), (100, 200), (2, 1), (1, 1), (u32::MAX, u32::MAX)] {
            let _ = Location::find("äb\nc", Span::new(s, e));
            let _ = Location::find("", Span::new(s, e));
        }
    }

    #[test]
    fn long_lines_are_windowed() {
        let src = format!("{}x{}", "a".repeat(500), "b".repeat(500));
        let loc = Location::find(&src, Span::new(500, 501));
        assert!(loc.excerpt.chars().count() <= EXCERPT_CHARS_MAX + 2);
        let caret_char = loc.excerpt.chars().nth(loc.caret_offset as usize);
        assert_eq!(caret_char, Some('x'));
    }
}
