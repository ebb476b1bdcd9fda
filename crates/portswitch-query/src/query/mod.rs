//! Queries: `SELECT … FROM … WHERE … GROUP BY … HAVING … ORDER BY … LIMIT …` over
//! nested records, whose expressions are the expression language of this crate.
//!
//! A statement is prepared once against a [`Catalog`] (the sources it may read, their row
//! types and virtual fields): parsed, its virtual fields expanded, its aggregates and
//! group keys separated from the row expressions, every expression type-checked and
//! compiled, and its WHERE split into conjuncts that run at the earliest FROM item they
//! depend on. [`Query::run`] then pulls rows from the sources the caller opens (I/O stays
//! with the caller: this module only sees iterators of [`Value`]s) and pushes result rows
//! into a sink.
//!
//! The model is PartiQL's: a FROM item after the first may range over a list inside an
//! earlier item's row (`FROM flights f, f.Segments s`: one row per segment, the flight's
//! fields visible through `f`), or over another source (`JOIN airports a ON
//! a.Code == s.Origin`, a hash join when ON is an equality of the two sides).
//!
//! Every resource a query can use is bounded by [`QueryLimits`] (rows examined, result
//! rows, groups, rows held for a join, time) on top of the expression limits of each
//! evaluation, and every refusal is a typed [`QueryError`].

mod exec;
mod keys;
mod plan;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::error::{CompileError, EvalError};
use crate::limits::Limits;
use crate::types::Type;
use crate::value::Value;

pub use exec::RunStats;
pub use plan::Query;

/// Rows examined by one query at most (source rows, unnested elements and join
/// candidates): a full scan of a billion-record source takes minutes, not more.
pub const ROWS_EXAMINED_MAX: u64 = 1_000_000_000;
/// Result rows one query may produce (or hold for ORDER BY) at most.
pub const RESULT_ROWS_MAX: u64 = 1_000_000;
/// Groups one GROUP BY may hold at most.
pub const GROUPS_MAX: u64 = 1_000_000;
/// Rows of a joined source held in memory at most.
pub const JOIN_ROWS_MAX: u64 = 10_000_000;
/// Wall-clock time one query may run.
pub const TIME_MAX: Duration = Duration::from_secs(300);
/// Depth of virtual fields defined in terms of other virtual fields.
pub const VIRTUAL_DEPTH_MAX: usize = 8;

/// What a query may consume. The expression limits apply to each evaluation of each of
/// its expressions and to the whole statement's size when it is compiled.
#[derive(Clone, Debug)]
pub struct QueryLimits {
    /// Limits of the expressions (and of the statement's source length, nodes, depth).
    pub expr: Limits,
    /// [`ROWS_EXAMINED_MAX`].
    pub rows_examined_max: u64,
    /// [`RESULT_ROWS_MAX`].
    pub result_rows_max: u64,
    /// [`GROUPS_MAX`].
    pub groups_max: u64,
    /// [`JOIN_ROWS_MAX`].
    pub join_rows_max: u64,
    /// [`TIME_MAX`].
    pub time_max: Duration,
}

impl Default for QueryLimits {
    fn default() -> QueryLimits {
        QueryLimits {
            expr: Limits::default(),
            rows_examined_max: ROWS_EXAMINED_MAX,
            result_rows_max: RESULT_ROWS_MAX,
            groups_max: GROUPS_MAX,
            join_rows_max: JOIN_ROWS_MAX,
            time_max: TIME_MAX,
        }
    }
}

/// A source's row type and virtual fields.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    /// The type of its rows (`dyn` when unknown: JSON files).
    pub row: Type,
    /// Virtual fields: `(name, expression)`, the expression over the row's fields
    /// (`Segments.size()`), usable as `alias.name` as if stored.
    pub virtuals: Vec<(String, String)>,
}

impl Default for SourceInfo {
    /// `dyn` rows, no virtual fields.
    fn default() -> SourceInfo {
        SourceInfo {
            row: Type::Dyn,
            virtuals: Vec::new(),
        }
    }
}

/// The sources a statement may name.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    sources: HashMap<String, SourceInfo>,
    open: bool,
}

impl Catalog {
    /// A catalog that knows only the sources added to it.
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// A catalog that accepts any source name, with `dyn` rows and no virtual fields
    /// unless added: for tools whose caller resolves names when opening.
    pub fn open() -> Catalog {
        Catalog {
            sources: HashMap::new(),
            open: true,
        }
    }

    /// Adds a source.
    pub fn with(mut self, name: impl Into<String>, info: SourceInfo) -> Catalog {
        self.insert(name, info);
        self
    }

    /// Adds a source.
    pub fn insert(&mut self, name: impl Into<String>, info: SourceInfo) {
        self.sources.insert(name.into(), info);
    }

    fn get(&self, name: &str) -> Option<std::borrow::Cow<'_, SourceInfo>> {
        match self.sources.get(name) {
            Some(info) => Some(std::borrow::Cow::Borrowed(info)),
            None if self.open => Some(std::borrow::Cow::Owned(SourceInfo::default())),
            None => None,
        }
    }
}

/// A comparison a source may apply itself (push-down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    /// As SQL spells it.
    pub fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// `field op value`: a conjunct of the query's conditions on one source's top-level
/// field, which that source may apply while reading. It is only a hint: the engine
/// evaluates every condition again, so a source may ignore it, but it must never drop a
/// row the comparison would keep.
#[derive(Clone, Debug, PartialEq)]
pub struct Pushed {
    /// The row's top-level field.
    pub field: String,
    /// The comparison.
    pub op: CmpOp,
    /// A literal: int, float, string or bool.
    pub value: Value,
}

/// A source the query reads, with what it needs from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Scan {
    /// The name in FROM.
    pub name: String,
    /// Its literal arguments (`ports("svc/")`).
    pub args: Vec<Value>,
    /// The alias it is bound to.
    pub alias: String,
    /// The top-level fields the query reads, or `None` if it uses whole rows.
    pub fields: Option<Vec<String>>,
    /// Conditions the source may apply itself.
    pub filters: Vec<Pushed>,
}

/// Rows of an opened source. An `Err` item ends the query with [`QueryError::Source`].
pub type Rows<'a> = Box<dyn Iterator<Item = Result<Value, String>> + 'a>;

/// Opens the sources of a query: the I/O edge.
pub trait Sources {
    /// Opens `scan` for reading.
    fn open(&self, scan: &Scan) -> Result<Rows<'_>, String>;
}

/// Which bound of [`QueryLimits`] a query reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryLimit {
    /// [`QueryLimits::rows_examined_max`].
    RowsExamined,
    /// [`QueryLimits::result_rows_max`].
    ResultRows,
    /// [`QueryLimits::groups_max`].
    Groups,
    /// [`QueryLimits::join_rows_max`].
    JoinRows,
    /// [`QueryLimits::time_max`] (the figure is in milliseconds).
    Time,
}

impl fmt::Display for QueryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueryLimit::RowsExamined => "rows examined",
            QueryLimit::ResultRows => "result rows",
            QueryLimit::Groups => "groups",
            QueryLimit::JoinRows => "rows held for a join",
            QueryLimit::Time => "time (ms)",
        })
    }
}

/// Why a query was refused or stopped.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement does not compile; located in the statement.
    #[error("{0}")]
    Compile(CompileError),
    /// A virtual field's expression does not compile; located in that expression.
    #[error("virtual field `{field}`: {error}")]
    Virtual {
        /// `source.field`.
        field: String,
        /// Why.
        error: CompileError,
    },
    /// An expression failed on some row; located in the statement.
    #[error("{0}")]
    Eval(EvalError),
    /// A source could not be opened or read.
    #[error("source `{source_name}`: {message}")]
    Source {
        /// The source's name in FROM.
        source_name: String,
        /// What it said.
        message: String,
    },
    /// A bound of [`QueryLimits`] was reached.
    #[error("query stopped: more than {max} {limit}")]
    Limit {
        /// Which.
        limit: QueryLimit,
        /// Its value.
        max: u64,
    },
}

impl From<CompileError> for QueryError {
    fn from(e: CompileError) -> QueryError {
        QueryError::Compile(e)
    }
}

impl From<EvalError> for QueryError {
    fn from(e: EvalError) -> QueryError {
        QueryError::Eval(e)
    }
}

#[cfg(test)]
mod tests;
