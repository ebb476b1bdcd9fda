//! The syntax tree, as the parser produces it: every node carries the byte span of its
//! source. Macros (`all`, `exists`, `map`, `filter`, `has`) are recognised by the parser
//! and have nodes of their own.
//!
//! `Display` prints an expression back as source that parses to the same tree (spans
//! aside): binary and conditional expressions are fully parenthesised, which is what the
//! round-trip property test relies on.

use std::fmt::{self, Write as _};

use crate::error::Span;
use crate::value::{write_quoted_bytes, write_quoted_str};

/// An expression with its source span.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    /// What it is.
    pub kind: ExprKind,
    /// Where it is.
    pub span: Span,
}

/// The kinds of expression.
#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// `null`
    Null,
    /// `true`, `false`
    Bool(bool),
    /// `42`, `-7`, `0x2a` (a `-` directly before a literal is part of it).
    Int(i64),
    /// `1.5`, `1e9`
    Float(f64),
    /// `"text"`, `'text'`, `r"raw"`
    String(String),
    /// `b"bytes"`
    Bytes(Vec<u8>),
    /// A variable: `Country`, or a loop variable.
    Ident(String),
    /// Field selection `target.field`.
    Member {
        /// The record or map.
        target: Box<Expr>,
        /// The field name.
        field: String,
    },
    /// Indexing `target[index]`.
    Index {
        /// The list or map.
        target: Box<Expr>,
        /// The index or key.
        index: Box<Expr>,
    },
    /// A function call `f(args)`.
    Call {
        /// Function name.
        function: String,
        /// Arguments.
        args: Vec<Expr>,
    },
    /// A method call `target.f(args)`; the same functions as calls, with the target as
    /// the first argument.
    Method {
        /// Receiver.
        target: Box<Expr>,
        /// Method name.
        method: String,
        /// Arguments after the receiver.
        args: Vec<Expr>,
    },
    /// `!x`, `-x`
    Unary {
        /// Operator.
        op: UnaryOp,
        /// Operand.
        operand: Box<Expr>,
    },
    /// `a op b`
    Binary {
        /// Operator.
        op: BinaryOp,
        /// Left operand.
        lhs: Box<Expr>,
        /// Right operand.
        rhs: Box<Expr>,
    },
    /// `cond ? then : otherwise`
    Ternary {
        /// Condition.
        cond: Box<Expr>,
        /// Value if true.
        then: Box<Expr>,
        /// Value if false.
        otherwise: Box<Expr>,
    },
    /// `[a, b]`
    List(Vec<Expr>),
    /// `{k: v}`
    Map(Vec<(Expr, Expr)>),
    /// `range.all(var, body)` and the other loop macros.
    Comprehension {
        /// Which macro.
        kind: Macro,
        /// The list (or map, whose keys are iterated).
        range: Box<Expr>,
        /// The loop variable.
        var: String,
        /// Predicate or mapped expression.
        body: Box<Expr>,
    },
    /// `has(target.field)`: whether the map has the key.
    Has {
        /// The map.
        target: Box<Expr>,
        /// The key.
        field: String,
    },
}

/// Unary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// `!`
    Not,
    /// `-`
    Neg,
}

/// Binary operators, loosest-binding last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Rem,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `in`
    In,
    /// `&&`
    And,
    /// `||`
    Or,
}

impl BinaryOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Rem => "%",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::In => "in",
            BinaryOp::And => "&&",
            BinaryOp::Or => "||",
        }
    }

    /// Binding strength: higher binds tighter. All binary operators associate left.
    pub fn precedence(self) -> u8 {
        match self {
            BinaryOp::Or => 1,
            BinaryOp::And => 2,
            BinaryOp::Lt
            | BinaryOp::Le
            | BinaryOp::Gt
            | BinaryOp::Ge
            | BinaryOp::Eq
            | BinaryOp::Ne
            | BinaryOp::In => 3,
            BinaryOp::Add | BinaryOp::Sub => 4,
            BinaryOp::Mul | BinaryOp::Div | BinaryOp::Rem => 5,
        }
    }
}

/// The loop macros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Macro {
    /// `l.all(x, p)`: `p` holds for every element.
    All,
    /// `l.exists(x, p)`: `p` holds for some element.
    Exists,
    /// `l.map(x, e)`: the list of `e` for every element.
    Map,
    /// `l.filter(x, p)`: the elements for which `p` holds.
    Filter,
}

impl Macro {
    /// The macro's name.
    pub fn name(self) -> &'static str {
        match self {
            Macro::All => "all",
            Macro::Exists => "exists",
            Macro::Map => "map",
            Macro::Filter => "filter",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Macro> {
        Some(match name {
            "all" => Macro::All,
            "exists" => Macro::Exists,
            "map" => Macro::Map,
            "filter" => Macro::Filter,
            _ => return None,
        })
    }
}

impl Expr {
    /// The same tree with every span zeroed, for comparing trees parsed from different
    /// spellings of the same expression.
    pub fn without_spans(&self) -> Expr {
        let mut e = self.clone();
        e.clear_spans();
        e
    }

    fn clear_spans(&mut self) {
        self.span = Span::default();
        match &mut self.kind {
            ExprKind::Null
            | ExprKind::Bool(_)
            | ExprKind::Int(_)
            | ExprKind::Float(_)
            | ExprKind::String(_)
            | ExprKind::Bytes(_)
            | ExprKind::Ident(_) => {}
            ExprKind::Member { target, .. } | ExprKind::Has { target, .. } => target.clear_spans(),
            ExprKind::Index { target, index } => {
                target.clear_spans();
                index.clear_spans();
            }
            ExprKind::Call { args, .. } | ExprKind::List(args) => {
                args.iter_mut().for_each(Expr::clear_spans)
            }
            ExprKind::Method { target, args, .. } => {
                target.clear_spans();
                args.iter_mut().for_each(Expr::clear_spans);
            }
            ExprKind::Unary { operand, .. } => operand.clear_spans(),
            ExprKind::Binary { lhs, rhs, .. } => {
                lhs.clear_spans();
                rhs.clear_spans();
            }
            ExprKind::Ternary {
                cond,
                then,
                otherwise,
            } => {
                cond.clear_spans();
                then.clear_spans();
                otherwise.clear_spans();
            }
            ExprKind::Map(entries) => {
                for (k, v) in entries {
                    k.clear_spans();
                    v.clear_spans();
                }
            }
            ExprKind::Comprehension { range, body, .. } => {
                range.clear_spans();
                body.clear_spans();
            }
        }
    }

    fn is_numeric_literal(&self) -> bool {
        matches!(self.kind, ExprKind::Int(_) | ExprKind::Float(_))
    }

    fn is_negative_literal(&self) -> bool {
        match self.kind {
            ExprKind::Int(i) => i < 0,
            ExprKind::Float(f) => f.is_sign_negative(),
            _ => false,
        }
    }

    /// Prints `self` where a postfix operator (`.f`, `[i]`) follows: a prefix operator or
    /// a negative literal would otherwise capture the postfix (`-a.b` is `-(a.b)`).
    fn fmt_postfix_target(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if matches!(self.kind, ExprKind::Unary { .. }) || self.is_negative_literal() {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

fn fmt_list(f: &mut fmt::Formatter<'_>, items: &[Expr]) -> fmt::Result {
    for (i, e) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{e}")?;
    }
    Ok(())
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Null => f.write_str("null"),
            ExprKind::Bool(b) => write!(f, "{b}"),
            ExprKind::Int(i) => write!(f, "{i}"),
            // `{:?}` is the shortest text that parses back to the same f64, and always has
            // a `.` or an exponent, so it lexes as a float.
            ExprKind::Float(x) => write!(f, "{x:?}"),
            ExprKind::String(s) => write_quoted_str(f, s),
            ExprKind::Bytes(b) => write_quoted_bytes(f, b),
            ExprKind::Ident(name) => f.write_str(name),
            ExprKind::Member { target, field } => {
                target.fmt_postfix_target(f)?;
                write!(f, ".{field}")
            }
            ExprKind::Index { target, index } => {
                target.fmt_postfix_target(f)?;
                write!(f, "[{index}]")
            }
            ExprKind::Call { function, args } => {
                write!(f, "{function}(")?;
                fmt_list(f, args)?;
                f.write_char(')')
            }
            ExprKind::Method {
                target,
                method,
                args,
            } => {
                target.fmt_postfix_target(f)?;
                write!(f, ".{method}(")?;
                fmt_list(f, args)?;
                f.write_char(')')
            }
            ExprKind::Unary { op, operand } => {
                f.write_char(match op {
                    UnaryOp::Not => '!',
                    UnaryOp::Neg => '-',
                })?;
                // `-5` would read back as the literal -5, not a negation of 5.
                if *op == UnaryOp::Neg && operand.is_numeric_literal() {
                    write!(f, "({operand})")
                } else {
                    operand.fmt_postfix_target(f)
                }
            }
            ExprKind::Binary { op, lhs, rhs } => write!(f, "({lhs} {} {rhs})", op.symbol()),
            ExprKind::Ternary {
                cond,
                then,
                otherwise,
            } => write!(f, "({cond} ? {then} : {otherwise})"),
            ExprKind::List(items) => {
                f.write_char('[')?;
                fmt_list(f, items)?;
                f.write_char(']')
            }
            ExprKind::Map(entries) => {
                f.write_char('{')?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_char('}')
            }
            ExprKind::Comprehension {
                kind,
                range,
                var,
                body,
            } => {
                range.fmt_postfix_target(f)?;
                write!(f, ".{}({var}, {body})", kind.name())
            }
            ExprKind::Has { target, field } => {
                f.write_str("has(")?;
                target.fmt_postfix_target(f)?;
                write!(f, ".{field})")
            }
        }
    }
}

/// A query statement: `SELECT … FROM … [WHERE …] [GROUP BY …] [HAVING …] [ORDER BY …]
/// [LIMIT n [OFFSET m]]`. Its expressions are expressions of the language above, with the
/// aggregates `count(*)`, `count(e)`, `sum`, `min`, `max` and `avg` allowed in SELECT,
/// HAVING and ORDER BY.
#[derive(Clone, Debug, PartialEq)]
pub struct Select {
    /// `SELECT DISTINCT`.
    pub distinct: bool,
    /// The projection; empty for `SELECT *`.
    pub items: Vec<SelectItem>,
    /// Where `*` was, for `SELECT *`.
    pub star: Option<Span>,
    /// FROM items in order: the first is a source, later ones join it.
    pub from: Vec<FromItem>,
    /// WHERE.
    pub filter: Option<Expr>,
    /// GROUP BY.
    pub group_by: Vec<Expr>,
    /// HAVING.
    pub having: Option<Expr>,
    /// ORDER BY.
    pub order_by: Vec<OrderItem>,
    /// LIMIT, with its span.
    pub limit: Option<(u64, Span)>,
    /// OFFSET, with its span.
    pub offset: Option<(u64, Span)>,
    /// The whole statement.
    pub span: Span,
}

/// One column of the projection.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectItem {
    /// Its value.
    pub expr: Expr,
    /// `AS name`.
    pub alias: Option<String>,
}

/// How a FROM item joins what precedes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    /// The first item, `, item` or `JOIN item`: rows that have a match only.
    Inner,
    /// `LEFT JOIN item`: a row with no match is kept once with the item's alias `null`.
    Left,
}

/// What a FROM item ranges over.
#[derive(Clone, Debug, PartialEq)]
pub enum FromSource {
    /// A named source (`flights`, `"data.ndjson"`, `ports("svc/")`), with literal
    /// arguments.
    Named {
        /// The name.
        name: String,
        /// Arguments.
        args: Vec<Expr>,
    },
    /// A list inside an earlier item's row (`f.Segments`): one row per element.
    Unnest(Expr),
}

/// One item of FROM.
#[derive(Clone, Debug, PartialEq)]
pub struct FromItem {
    /// What it ranges over.
    pub source: FromSource,
    /// The name its rows are bound to.
    pub alias: String,
    /// How it joins.
    pub join: JoinKind,
    /// `ON cond`.
    pub on: Option<Expr>,
    /// Where it is.
    pub span: Span,
}

/// One key of ORDER BY.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderItem {
    /// The key.
    pub expr: Expr,
    /// `DESC`.
    pub descending: bool,
}
