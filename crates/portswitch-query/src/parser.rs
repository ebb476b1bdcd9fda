//! The parser: tokens to [`Expr`], by precedence climbing.
//!
//! Grammar (CEL's, without `?.`, unsigned literals and message construction):
//!
//! ```text
//! expr     = or ["?" or ":" expr]
//! or       = and {"||" and}          and = rel {"&&" rel}
//! rel      = add {("<"|"<="|">"|">="|"=="|"!="|"in") add}
//! add      = mul {("+"|"-") mul}     mul = unary {("*"|"/"|"%") unary}
//! unary    = ("!"|"-") unary | postfix
//! postfix  = primary {"." IDENT ["(" args ")"] | "[" expr "]"}
//! primary  = literal | IDENT ["(" args ")"] | "(" expr ")"
//!          | "[" [expr {"," expr} [","]] "]" | "{" [expr ":" expr {"," …} [","]] "}"
//! ```
//!
//! Every limit is enforced as the tree is built, so hostile input never gets far: node
//! count, recursion depth of the parser itself (`((((…` fails at the limit, it never
//! overflows the stack), and the height of the tree produced (long operator chains build
//! left-deep trees without recursing in the parser, but later passes do recurse).

use crate::ast::{
    BinaryOp, Expr, ExprKind, FromItem, FromSource, JoinKind, Macro, OrderItem, Select, SelectItem,
    UnaryOp,
};
use crate::error::{CompileError, CompileErrorKind as K, Span};
use crate::lexer::{Lexer, Tok, Token};
use crate::limits::Limits;

/// Parses `src` under `limits`. Errors carry spans but no location yet.
pub(crate) fn parse(src: &str, limits: &Limits) -> Result<Expr, CompileError> {
    check_length(src, limits)?;
    let mut p = Parser::new(src, limits, false)?;
    let e = p.expr()?;
    if p.cur.tok != Tok::Eof {
        return Err(p.unexpected("an operator or end of input"));
    }
    Ok(e.expr)
}

/// Parses a SELECT statement (grammar in docs/QUERY.md). Its expressions are parsed by
/// the same parser, under the same limits (node count and depth over the whole
/// statement), with `count(*)` allowed.
pub(crate) fn parse_select(src: &str, limits: &Limits) -> Result<Select, CompileError> {
    check_length(src, limits)?;
    let mut p = Parser::new(src, limits, true)?;
    let select = p.select()?;
    if p.cur.tok != Tok::Eof {
        return Err(p.clause_expected());
    }
    Ok(select)
}

fn check_length(src: &str, limits: &Limits) -> Result<(), CompileError> {
    let max = limits.source_bytes();
    if src.len() > max {
        let end = u32::try_from(max).unwrap_or(u32::MAX);
        return Err(CompileError::new(
            K::SourceTooLong {
                len: src.len(),
                max,
            },
            Span::new(end, end),
        ));
    }
    Ok(())
}

/// An expression and the height of its tree (a leaf is 1).
struct Parsed {
    expr: Expr,
    height: usize,
}

struct Parser<'s> {
    lexer: Lexer<'s>,
    cur: Token<'s>,
    ahead: Option<Token<'s>>,
    nodes: usize,
    nodes_max: usize,
    depth: usize,
    depth_max: usize,
    /// In a statement: `f(*)` parses (as `f()`), for `count(*)`.
    star_args: bool,
}

fn binary_op(tok: &Tok<'_>) -> Option<BinaryOp> {
    Some(match tok {
        Tok::Star => BinaryOp::Mul,
        Tok::Slash => BinaryOp::Div,
        Tok::Percent => BinaryOp::Rem,
        Tok::Plus => BinaryOp::Add,
        Tok::Minus => BinaryOp::Sub,
        Tok::Lt => BinaryOp::Lt,
        Tok::Le => BinaryOp::Le,
        Tok::Gt => BinaryOp::Gt,
        Tok::Ge => BinaryOp::Ge,
        Tok::EqEq => BinaryOp::Eq,
        Tok::NotEq => BinaryOp::Ne,
        Tok::In => BinaryOp::In,
        Tok::AndAnd => BinaryOp::And,
        Tok::OrOr => BinaryOp::Or,
        _ => return None,
    })
}

impl<'s> Parser<'s> {
    fn new(src: &'s str, limits: &Limits, star_args: bool) -> Result<Parser<'s>, CompileError> {
        let mut lexer = Lexer::new(src);
        let cur = lexer.next_token()?;
        Ok(Parser {
            lexer,
            cur,
            ahead: None,
            nodes: 0,
            nodes_max: limits.nodes_max,
            depth: 0,
            depth_max: limits.depth(),
            star_args,
        })
    }

    fn bump(&mut self) -> Result<Token<'s>, CompileError> {
        let next = match self.ahead.take() {
            Some(t) => t,
            None => self.lexer.next_token()?,
        };
        Ok(std::mem::replace(&mut self.cur, next))
    }

    /// The token after the current one.
    fn peek2(&mut self) -> Result<&Tok<'s>, CompileError> {
        if self.ahead.is_none() {
            self.ahead = Some(self.lexer.next_token()?);
        }
        Ok(self.ahead.as_ref().map_or(&Tok::Eof, |t| &t.tok))
    }

    fn unexpected(&self, expected: &str) -> CompileError {
        CompileError::new(
            K::Unexpected {
                expected: expected.to_owned(),
                found: self.cur.tok.describe(),
            },
            self.cur.span,
        )
    }

    fn expect(&mut self, tok: Tok<'static>, expected: &str) -> Result<Span, CompileError> {
        if self.cur.tok == tok {
            Ok(self.bump()?.span)
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn ident(&mut self, expected: &str) -> Result<(String, Span), CompileError> {
        match self.cur.tok {
            Tok::Ident(name) => {
                let span = self.bump()?.span;
                Ok((name.to_owned(), span))
            }
            _ => Err(self.unexpected(expected)),
        }
    }

    /// Guards the parser's own recursion.
    fn enter(&mut self) -> Result<(), CompileError> {
        self.depth += 1;
        if self.depth > self.depth_max {
            return Err(CompileError::new(
                K::TooDeep {
                    max: self.depth_max,
                },
                self.cur.span,
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Makes a node, counting it and checking the height of the tree it tops.
    fn node(&mut self, kind: ExprKind, span: Span, height: usize) -> Result<Parsed, CompileError> {
        self.nodes += 1;
        if self.nodes > self.nodes_max {
            return Err(CompileError::new(
                K::TooManyNodes {
                    max: self.nodes_max,
                },
                span,
            ));
        }
        if height > self.depth_max {
            return Err(CompileError::new(
                K::TooDeep {
                    max: self.depth_max,
                },
                span,
            ));
        }
        Ok(Parsed {
            expr: Expr { kind, span },
            height,
        })
    }

    fn expr(&mut self) -> Result<Parsed, CompileError> {
        self.enter()?;
        let cond = self.binary(0)?;
        let result = if self.cur.tok == Tok::Question {
            self.bump()?;
            let then = self.binary(0)?;
            self.expect(Tok::Colon, "`:`")?;
            let otherwise = self.expr()?;
            let span = cond.expr.span.to(otherwise.expr.span);
            let height = 1 + cond.height.max(then.height).max(otherwise.height);
            self.node(
                ExprKind::Ternary {
                    cond: Box::new(cond.expr),
                    then: Box::new(then.expr),
                    otherwise: Box::new(otherwise.expr),
                },
                span,
                height,
            )?
        } else {
            cond
        };
        self.leave();
        Ok(result)
    }

    /// Operators binding tighter than `min_precedence`, left-associative.
    fn binary(&mut self, min_precedence: u8) -> Result<Parsed, CompileError> {
        let mut lhs = self.unary()?;
        while let Some(op) = binary_op(&self.cur.tok) {
            if op.precedence() <= min_precedence {
                break;
            }
            self.bump()?;
            self.enter()?;
            let rhs = self.binary(op.precedence())?;
            self.leave();
            let span = lhs.expr.span.to(rhs.expr.span);
            let height = 1 + lhs.height.max(rhs.height);
            lhs = self.node(
                ExprKind::Binary {
                    op,
                    lhs: Box::new(lhs.expr),
                    rhs: Box::new(rhs.expr),
                },
                span,
                height,
            )?;
        }
        Ok(lhs)
    }

    /// Prefix operators and what they apply to. The operators are collected in a loop,
    /// not by recursion: `!!!!…x` costs no stack.
    fn unary(&mut self) -> Result<Parsed, CompileError> {
        let mut prefixes: Vec<(UnaryOp, Span)> = Vec::new();
        let operand = loop {
            let op = match self.cur.tok {
                Tok::Bang => UnaryOp::Not,
                Tok::Minus => UnaryOp::Neg,
                _ => break self.postfix()?,
            };
            let span = self.bump()?.span;
            if op == UnaryOp::Neg {
                if let Some(literal) = self.negative_literal(span)? {
                    break literal;
                }
            }
            if prefixes.len() >= self.depth_max {
                return Err(CompileError::new(
                    K::TooDeep {
                        max: self.depth_max,
                    },
                    span,
                ));
            }
            prefixes.push((op, span));
        };
        prefixes
            .into_iter()
            .rev()
            .try_fold(operand, |operand, (op, start)| {
                let span = start.to(operand.expr.span);
                let height = operand.height + 1;
                self.node(
                    ExprKind::Unary {
                        op,
                        operand: Box::new(operand.expr),
                    },
                    span,
                    height,
                )
            })
    }

    /// `-` directly before a number literal that no postfix operator follows is part of
    /// the literal: this is how `-9223372036854775808` (whose magnitude is no i64) parses,
    /// and it saves a node. `-5.abs()` stays a negation of `5.abs()`.
    fn negative_literal(&mut self, minus: Span) -> Result<Option<Parsed>, CompileError> {
        let kind = match self.cur.tok {
            Tok::Int(u) => {
                if matches!(self.peek2()?, Tok::Dot | Tok::LBracket) {
                    return Ok(None);
                }
                let value = i64::try_from(-i128::from(u)).map_err(|_| {
                    CompileError::new(
                        K::InvalidNumber(format!("-{u}: below the smallest int")),
                        minus.to(self.cur.span),
                    )
                })?;
                ExprKind::Int(value)
            }
            Tok::Float(x) => {
                if matches!(self.peek2()?, Tok::Dot | Tok::LBracket) {
                    return Ok(None);
                }
                ExprKind::Float(-x)
            }
            _ => return Ok(None),
        };
        let span = minus.to(self.bump()?.span);
        self.node(kind, span, 1).map(Some)
    }

    // The recursive descent keeps each function's frame small (one construct per
    // function): unoptimised builds give every local of a function its own stack slot,
    // and the frames on the recursive path are what `DEPTH_MAX` is measured against.

    fn postfix(&mut self) -> Result<Parsed, CompileError> {
        let mut p = self.primary()?;
        loop {
            p = match self.cur.tok {
                Tok::Dot => self.dot(p)?,
                Tok::LBracket => self.index(p)?,
                _ => return Ok(p),
            };
        }
    }

    /// `.field`, `.method(args)` or `.macro(var, expr)` after `p`.
    fn dot(&mut self, p: Parsed) -> Result<Parsed, CompileError> {
        self.bump()?;
        let (name, name_span) = self.ident("a field or method name")?;
        if self.cur.tok != Tok::LParen {
            let span = p.expr.span.to(name_span);
            return self.node(
                ExprKind::Member {
                    target: Box::new(p.expr),
                    field: name,
                },
                span,
                p.height + 1,
            );
        }
        self.bump()?;
        let (args, args_height, end) = self.args(Tok::RParen, "`,` or `)`")?;
        let span = p.expr.span.to(end);
        let height = 1 + p.height.max(args_height);
        match Macro::from_name(&name) {
            Some(kind) => self.comprehension(kind, p.expr, args, span, height),
            None => self.node(
                ExprKind::Method {
                    target: Box::new(p.expr),
                    method: name,
                    args,
                },
                span,
                height,
            ),
        }
    }

    /// `[index]` after `p`.
    fn index(&mut self, p: Parsed) -> Result<Parsed, CompileError> {
        self.bump()?;
        let index = self.expr()?;
        let end = self.expect(Tok::RBracket, "`]`")?;
        let span = p.expr.span.to(end);
        let height = 1 + p.height.max(index.height);
        self.node(
            ExprKind::Index {
                target: Box::new(p.expr),
                index: Box::new(index.expr),
            },
            span,
            height,
        )
    }

    fn comprehension(
        &mut self,
        kind: Macro,
        range: Expr,
        mut args: Vec<Expr>,
        span: Span,
        height: usize,
    ) -> Result<Parsed, CompileError> {
        let shape_error = || {
            CompileError::new(
                K::BadMacro(format!(
                    "`{}` takes a variable name and an expression: list.{}(x, ...)",
                    kind.name(),
                    kind.name()
                )),
                span,
            )
        };
        let (Some(body), Some(var), None) = (args.pop(), args.pop(), args.pop()) else {
            return Err(shape_error());
        };
        let ExprKind::Ident(var) = var.kind else {
            return Err(shape_error());
        };
        self.node(
            ExprKind::Comprehension {
                kind,
                range: Box::new(range),
                var,
                body: Box::new(body),
            },
            span,
            height,
        )
    }

    /// Comma-separated expressions up to `close` (which is consumed); a trailing comma is
    /// allowed. Returns them, their greatest height and the span of `close`.
    fn args(
        &mut self,
        close: Tok<'static>,
        expected: &str,
    ) -> Result<(Vec<Expr>, usize, Span), CompileError> {
        let mut items = Vec::new();
        let mut height = 0;
        loop {
            if self.cur.tok == close {
                let end = self.bump()?.span;
                return Ok((items, height, end));
            }
            let item = self.expr()?;
            height = height.max(item.height);
            items.push(item.expr);
            if self.cur.tok == Tok::Comma {
                self.bump()?;
            } else if self.cur.tok != close {
                return Err(self.unexpected(expected));
            }
        }
    }

    fn primary(&mut self) -> Result<Parsed, CompileError> {
        match self.cur.tok {
            Tok::Ident(_) => self.name(),
            Tok::LParen => self.paren(),
            Tok::LBracket => self.list_literal(),
            Tok::LBrace => self.map_literal(),
            _ => self.literal(),
        }
    }

    fn literal(&mut self) -> Result<Parsed, CompileError> {
        let span = self.cur.span;
        let kind = match &self.cur.tok {
            Tok::Int(u) => match i64::try_from(*u) {
                Ok(i) => ExprKind::Int(i),
                Err(_) => {
                    return Err(CompileError::new(
                        K::InvalidNumber(format!("{u}: above the largest int")),
                        span,
                    ))
                }
            },
            Tok::Float(x) => ExprKind::Float(*x),
            Tok::Str(s) => ExprKind::String(s.clone()),
            Tok::Bytes(b) => ExprKind::Bytes(b.clone()),
            Tok::True => ExprKind::Bool(true),
            Tok::False => ExprKind::Bool(false),
            Tok::Null => ExprKind::Null,
            _ => return Err(self.unexpected("an expression")),
        };
        self.bump()?;
        self.node(kind, span, 1)
    }

    fn paren(&mut self) -> Result<Parsed, CompileError> {
        self.bump()?;
        let inner = self.expr()?;
        self.expect(Tok::RParen, "`)`")?;
        Ok(inner)
    }

    fn list_literal(&mut self) -> Result<Parsed, CompileError> {
        let start = self.bump()?.span;
        let (items, height, end) = self.args(Tok::RBracket, "`,` or `]`")?;
        self.node(ExprKind::List(items), start.to(end), height + 1)
    }

    /// A variable, a function call, or `has(a.b)`.
    fn name(&mut self) -> Result<Parsed, CompileError> {
        let (name, span) = self.ident("a name")?;
        if self.cur.tok != Tok::LParen {
            return self.node(ExprKind::Ident(name), span, 1);
        }
        self.bump()?;
        if self.star_args && self.cur.tok == Tok::Star && *self.peek2()? == Tok::RParen {
            self.bump()?;
            let end = self.bump()?.span;
            return self.node(
                ExprKind::Call {
                    function: name,
                    args: Vec::new(),
                },
                span.to(end),
                1,
            );
        }
        let (args, args_height, end) = self.args(Tok::RParen, "`,` or `)`")?;
        let span = span.to(end);
        if name == "has" {
            return self.has(args, args_height, span);
        }
        self.node(
            ExprKind::Call {
                function: name,
                args,
            },
            span,
            args_height + 1,
        )
    }

    fn has(
        &mut self,
        mut args: Vec<Expr>,
        height: usize,
        span: Span,
    ) -> Result<Parsed, CompileError> {
        let arg = args.pop().filter(|_| args.is_empty());
        let Some(Expr {
            kind: ExprKind::Member { target, field },
            ..
        }) = arg
        else {
            return Err(CompileError::new(
                K::BadMacro("`has` takes a field selection: has(a.b)".into()),
                span,
            ));
        };
        // The selection's node becomes the `has` node: same count, same height.
        self.node(ExprKind::Has { target, field }, span, height)
    }

    fn map_literal(&mut self) -> Result<Parsed, CompileError> {
        let start = self.bump()?.span;
        let mut entries = Vec::new();
        let mut height = 0;
        loop {
            if self.cur.tok == Tok::RBrace {
                let end = self.bump()?.span;
                return self.node(ExprKind::Map(entries), start.to(end), height + 1);
            }
            let key = self.expr()?;
            self.expect(Tok::Colon, "`:`")?;
            let value = self.expr()?;
            height = height.max(key.height).max(value.height);
            entries.push((key.expr, value.expr));
            if self.cur.tok == Tok::Comma {
                self.bump()?;
            } else if self.cur.tok != Tok::RBrace {
                return Err(self.unexpected("`,` or `}`"));
            }
        }
    }
}

/// Words that start or shape a clause: never taken as an alias.
const KEYWORDS: &[&str] = &[
    "select", "distinct", "from", "as", "join", "left", "inner", "outer", "on", "where", "group",
    "by", "having", "order", "asc", "desc", "limit", "offset", "and", "or", "not",
];

fn is_keyword(word: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
}

/// The statement: clause keywords are identifiers to the lexer, compared without regard
/// to case; an expression stops at the first identifier that cannot continue it, which is
/// where the next clause (or an alias) begins.
impl Parser<'_> {
    fn at_kw(&self, kw: &str) -> bool {
        matches!(self.cur.tok, Tok::Ident(w) if w.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> Result<Option<Span>, CompileError> {
        if self.at_kw(kw) {
            Ok(Some(self.bump()?.span))
        } else {
            Ok(None)
        }
    }

    fn kw(&mut self, kw: &str) -> Result<Span, CompileError> {
        match self.eat_kw(kw)? {
            Some(span) => Ok(span),
            None => Err(self.unexpected(&format!("`{}`", kw.to_ascii_uppercase()))),
        }
    }

    fn clause_expected(&self) -> CompileError {
        let hint = match self.cur.tok {
            Tok::Ident(w) if w.eq_ignore_ascii_case("and") => " (write `&&` for AND)",
            Tok::Ident(w) if w.eq_ignore_ascii_case("or") => " (write `||` for OR)",
            Tok::Ident(w) if w.eq_ignore_ascii_case("not") => " (write `!` for NOT)",
            _ => "",
        };
        CompileError::new(
            K::Unexpected {
                expected: format!(
                    "WHERE, GROUP BY, HAVING, ORDER BY, LIMIT, OFFSET or end of input{hint}"
                ),
                found: self.cur.tok.describe(),
            },
            self.cur.span,
        )
    }

    /// An alias after an item: `AS name`, or a bare name that is not a keyword.
    fn alias(&mut self) -> Result<Option<String>, CompileError> {
        if self.eat_kw("as")?.is_some() {
            return match self.cur.tok {
                Tok::Ident(w) if !is_keyword(w) => Ok(Some(self.ident("an alias")?.0)),
                _ => Err(self.unexpected("an alias")),
            };
        }
        match self.cur.tok {
            Tok::Ident(w) if !is_keyword(w) => Ok(Some(self.ident("an alias")?.0)),
            _ => Ok(None),
        }
    }

    fn select(&mut self) -> Result<Select, CompileError> {
        let start = self.kw("select")?;
        let distinct = self.eat_kw("distinct")?.is_some();
        let mut items = Vec::new();
        let mut star = None;
        if self.cur.tok == Tok::Star {
            star = Some(self.bump()?.span);
        } else {
            loop {
                let expr = self.expr()?.expr;
                let alias = self.alias()?;
                items.push(SelectItem { expr, alias });
                if self.cur.tok != Tok::Comma {
                    break;
                }
                self.bump()?;
            }
        }
        self.kw("from")?;
        let mut from = vec![self.parse_from_item(JoinKind::Inner, &[])?];
        loop {
            let join = if self.cur.tok == Tok::Comma {
                self.bump()?;
                JoinKind::Inner
            } else if self.eat_kw("join")?.is_some() {
                JoinKind::Inner
            } else if self.eat_kw("inner")?.is_some() {
                self.kw("join")?;
                JoinKind::Inner
            } else if self.eat_kw("left")?.is_some() {
                self.eat_kw("outer")?;
                self.kw("join")?;
                JoinKind::Left
            } else {
                break;
            };
            let mut item = self.parse_from_item(join, &from)?;
            if self.eat_kw("on")?.is_some() {
                item.on = Some(self.expr()?.expr);
            }
            from.push(item);
        }
        let filter = match self.eat_kw("where")? {
            Some(_) => Some(self.expr()?.expr),
            None => None,
        };
        let mut group_by = Vec::new();
        if self.eat_kw("group")?.is_some() {
            self.kw("by")?;
            loop {
                group_by.push(self.expr()?.expr);
                if self.cur.tok != Tok::Comma {
                    break;
                }
                self.bump()?;
            }
        }
        let having = match self.eat_kw("having")? {
            Some(_) => Some(self.expr()?.expr),
            None => None,
        };
        let mut order_by = Vec::new();
        if self.eat_kw("order")?.is_some() {
            self.kw("by")?;
            loop {
                let expr = self.expr()?.expr;
                let descending = if self.eat_kw("desc")?.is_some() {
                    true
                } else {
                    self.eat_kw("asc")?;
                    false
                };
                order_by.push(OrderItem { expr, descending });
                if self.cur.tok != Tok::Comma {
                    break;
                }
                self.bump()?;
            }
        }
        let limit = match self.eat_kw("limit")? {
            Some(_) => Some(self.count("a row count after LIMIT")?),
            None => None,
        };
        let offset = match self.eat_kw("offset")? {
            Some(_) => Some(self.count("a row count after OFFSET")?),
            None => None,
        };
        Ok(Select {
            distinct,
            items,
            star,
            from,
            filter,
            group_by,
            having,
            order_by,
            limit,
            offset,
            span: start.to(self.cur.span),
        })
    }

    fn count(&mut self, expected: &str) -> Result<(u64, Span), CompileError> {
        match self.cur.tok {
            Tok::Int(n) => Ok((n, self.bump()?.span)),
            _ => Err(self.unexpected(expected)),
        }
    }

    /// `name [(args)] [AS] alias`, `"path" [AS] alias`, or `alias.path [AS] alias`
    /// (unnest: a path that starts with an earlier item's alias).
    fn parse_from_item(
        &mut self,
        join: JoinKind,
        before: &[FromItem],
    ) -> Result<FromItem, CompileError> {
        let start = self.cur.span;
        let (source, default_alias) = match self.cur.tok.clone() {
            Tok::Str(name) => {
                self.bump()?;
                (
                    FromSource::Named {
                        name,
                        args: Vec::new(),
                    },
                    None,
                )
            }
            Tok::Ident(word) if !is_keyword(word) => {
                let earlier = before.iter().any(|f| f.alias == word);
                if earlier && matches!(self.peek2()?, Tok::Dot | Tok::LBracket) {
                    (FromSource::Unnest(self.expr()?.expr), None)
                } else if earlier {
                    return Err(CompileError::new(
                        K::Statement(format!(
                            "`{word}` is an alias already; to range over a list in it, write `{word}.field AS name`"
                        )),
                        self.cur.span,
                    ));
                } else {
                    let (name, _) = self.ident("a source")?;
                    let args = if self.cur.tok == Tok::LParen {
                        self.bump()?;
                        self.args(Tok::RParen, "`,` or `)`")?.0
                    } else {
                        Vec::new()
                    };
                    let alias = name.clone();
                    (FromSource::Named { name, args }, Some(alias))
                }
            }
            _ => return Err(self.unexpected("a source name, a quoted path or an alias's list")),
        };
        let alias = match self.alias()? {
            Some(a) => a,
            None => default_alias.ok_or_else(|| {
                CompileError::new(
                    K::Statement("this FROM item needs a name: add `AS name`".into()),
                    start.to(self.cur.span),
                )
            })?,
        };
        Ok(FromItem {
            source,
            alias,
            join,
            on: None,
            span: start.to(self.cur.span),
        })
    }
}
