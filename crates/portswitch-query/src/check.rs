//! The type checker: [`Expr`] to a typed tree ([`TExpr`]) with names resolved.
//!
//! It rejects, with the position of the offending expression, everything whose types are
//! known to be wrong: `1 + "a"`, `size(1)`, `"a" < 1`, `1 ? 2 : 3`, unknown functions,
//! wrong arity, invalid regex literals, literal conversions that cannot succeed
//! (`timestamp("yesterday")`). Where an operand is `dyn` it accepts whatever the other
//! operand leaves possible, and the evaluator checks at run time.
//!
//! It also resolves names once and for all: variables to binding slots, loop variables to
//! scope indices, functions to [`Builtin`]s, constant keys to prehashed [`Key`]s, and
//! `matches` patterns to compiled regexes (the only place a regex is ever compiled).

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;

use crate::ast::{BinaryOp, Expr, ExprKind, Macro, UnaryOp};
use crate::compile::build_regex;
use crate::error::{CompileError, CompileErrorKind as K, Span};
use crate::eval::{float_to_int, Builtin};
use crate::limits::Limits;
use crate::types::{Schema, Type};
use crate::value::{Key, Value};

/// A checked expression: its type, its span, and what it is.
#[derive(Debug)]
pub(crate) struct TExpr {
    pub ty: Type,
    pub span: Span,
    pub kind: TKind,
}

#[derive(Debug)]
pub(crate) enum TKind {
    Const(Value),
    Var(u32),
    Local(u32),
    /// `a.b`, and `a["b"]` with a literal key.
    Field {
        target: Box<TExpr>,
        key: Key,
    },
    Index {
        target: Box<TExpr>,
        index: Box<TExpr>,
    },
    Has {
        target: Box<TExpr>,
        key: Key,
    },
    Unary {
        op: UnaryOp,
        operand: Box<TExpr>,
    },
    Binary {
        op: BinaryOp,
        lhs: Box<TExpr>,
        rhs: Box<TExpr>,
    },
    Ternary {
        cond: Box<TExpr>,
        then: Box<TExpr>,
        otherwise: Box<TExpr>,
    },
    List(Vec<TExpr>),
    Map(Vec<(TExpr, TExpr)>),
    Call {
        func: Builtin,
        args: Vec<TExpr>,
    },
    Matches {
        target: Box<TExpr>,
        regex: Box<Regex>,
    },
    Loop {
        kind: Macro,
        range: Box<TExpr>,
        local: u32,
        body: Box<TExpr>,
    },
}

/// The result of checking: the typed tree and the variables it reads, by slot.
#[derive(Debug)]
pub(crate) struct Checked {
    pub root: TExpr,
    pub vars: Vec<String>,
    pub regexes: usize,
}

pub(crate) fn check(
    expr: &Expr,
    schema: &Schema,
    limits: &Limits,
) -> Result<Checked, CompileError> {
    let mut checker = Checker {
        schema,
        limits,
        vars: Vec::new(),
        slots: HashMap::new(),
        locals: Vec::new(),
        regexes: 0,
    };
    let root = checker.expr(expr)?;
    Ok(Checked {
        root,
        vars: checker.vars,
        regexes: checker.regexes,
    })
}

struct Checker<'a> {
    schema: &'a Schema,
    limits: &'a Limits,
    vars: Vec<String>,
    slots: HashMap<String, u32>,
    /// Loop variables in scope, innermost last; a variable's index here is its scope
    /// index at run time.
    locals: Vec<(String, Type)>,
    regexes: usize,
}

fn type_error(span: Span, message: String) -> CompileError {
    CompileError::new(K::Type(message), span)
}

fn no_overload(span: Span, op: &str, types: &[&Type]) -> CompileError {
    let types: Vec<String> = types.iter().map(ToString::to_string).collect();
    type_error(
        span,
        format!("no overload of `{op}` for ({})", types.join(", ")),
    )
}

fn to_u32(n: usize) -> u32 {
    // Bounded by the node limit, far below u32::MAX.
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn supports_arith(op: BinaryOp, t: &Type) -> bool {
    match op {
        BinaryOp::Add => matches!(
            t,
            Type::Int
                | Type::Float
                | Type::String
                | Type::Bytes
                | Type::List(_)
                | Type::Time
                | Type::Duration
        ),
        BinaryOp::Sub => matches!(t, Type::Int | Type::Float | Type::Time | Type::Duration),
        BinaryOp::Mul | BinaryOp::Div => t.is_numeric(),
        _ => matches!(t, Type::Int),
    }
}

/// The result type of an arithmetic operator, or `None` if there is no overload.
/// Mixed int and float arithmetic is float.
fn arith_type(op: BinaryOp, l: &Type, r: &Type) -> Option<Type> {
    use BinaryOp::{Add, Div, Mul, Sub};
    if l.is_dyn() || r.is_dyn() {
        let known = if l.is_dyn() { r } else { l };
        return (known.is_dyn() || supports_arith(op, known)).then_some(Type::Dyn);
    }
    Some(match (op, l, r) {
        (_, Type::Int, Type::Int) => Type::Int,
        (Add | Sub | Mul | Div, a, b) if a.is_numeric() && b.is_numeric() => Type::Float,
        (Add, Type::String, Type::String) => Type::String,
        (Add, Type::Bytes, Type::Bytes) => Type::Bytes,
        (Add, Type::List(a), Type::List(b)) => Type::List(Arc::new(a.unify(b))),
        (Add, Type::Time, Type::Duration)
        | (Add, Type::Duration, Type::Time)
        | (Sub, Type::Time, Type::Duration) => Type::Time,
        (Sub, Type::Time, Type::Time) | (Add | Sub, Type::Duration, Type::Duration) => {
            Type::Duration
        }
        _ => return None,
    })
}

/// Whether `==` between the two types can ever be true without being an error: numbers
/// with numbers, `null` with anything, otherwise the same kind.
fn eq_compatible(l: &Type, r: &Type) -> bool {
    match (l, r) {
        (Type::Dyn, _) | (_, Type::Dyn) | (Type::Null, _) | (_, Type::Null) => true,
        (a, b) if a.is_numeric() && b.is_numeric() => true,
        (Type::List(a), Type::List(b)) => eq_compatible(a, b),
        (a, b) if a.is_map_like() && b.is_map_like() => true,
        (a, b) => a == b,
    }
}

fn orderable(t: &Type) -> bool {
    matches!(
        t,
        Type::Int
            | Type::Float
            | Type::String
            | Type::Bytes
            | Type::Bool
            | Type::Time
            | Type::Duration
    )
}

fn ord_compatible(l: &Type, r: &Type) -> bool {
    match (l, r) {
        (Type::Dyn, Type::Dyn) => true,
        (Type::Dyn, t) | (t, Type::Dyn) => orderable(t),
        (a, b) if a.is_numeric() && b.is_numeric() => true,
        (a, b) => a == b && orderable(a),
    }
}

fn in_compatible(l: &Type, r: &Type) -> bool {
    match r {
        Type::Dyn => true,
        Type::List(t) => eq_compatible(l, t),
        Type::Map(_) | Type::Record(_) => l.may_be(|t| *t == Type::String),
        _ => false,
    }
}

impl Checker<'_> {
    // One construct per function: the checker recurses over the tree, and in an
    // unoptimised build a function's frame holds every local of every match arm.

    fn expr(&mut self, e: &Expr) -> Result<TExpr, CompileError> {
        let span = e.span;
        let (kind, ty) = match &e.kind {
            ExprKind::Null
            | ExprKind::Bool(_)
            | ExprKind::Int(_)
            | ExprKind::Float(_)
            | ExprKind::String(_)
            | ExprKind::Bytes(_) => literal(&e.kind),
            ExprKind::Ident(name) => self.ident(name, span)?,
            ExprKind::Member { target, field } => self.member(target, field, span)?,
            ExprKind::Index { target, index } => self.index(target, index, span)?,
            ExprKind::Call { function, args } => self.call(function, None, args, span)?,
            ExprKind::Method {
                target,
                method,
                args,
            } => self.call(method, Some(target), args, span)?,
            ExprKind::Unary { op, operand } => self.unary(*op, operand, span)?,
            ExprKind::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs, span)?,
            ExprKind::Ternary {
                cond,
                then,
                otherwise,
            } => self.ternary(cond, then, otherwise)?,
            ExprKind::List(items) => self.list(items)?,
            ExprKind::Map(entries) => self.map_literal(entries)?,
            ExprKind::Comprehension {
                kind,
                range,
                var,
                body,
            } => self.comprehension(*kind, range, var, body)?,
            ExprKind::Has { target, field } => self.has(target, field, span)?,
        };
        Ok(TExpr { ty, span, kind })
    }

    fn member(
        &mut self,
        target: &Expr,
        field: &str,
        span: Span,
    ) -> Result<(TKind, Type), CompileError> {
        let target = self.expr(target)?;
        let ty = self.select(&target.ty, field, span)?;
        let key = Key::new(field);
        Ok((
            TKind::Field {
                target: Box::new(target),
                key,
            },
            ty,
        ))
    }

    fn unary(
        &mut self,
        op: UnaryOp,
        operand: &Expr,
        span: Span,
    ) -> Result<(TKind, Type), CompileError> {
        let operand = self.expr(operand)?;
        let ty = match op {
            UnaryOp::Not => {
                self.require_bool(&operand, "`!`")?;
                Type::Bool
            }
            UnaryOp::Neg => match &operand.ty {
                t @ (Type::Int | Type::Float | Type::Duration | Type::Dyn) => t.clone(),
                t => return Err(no_overload(span, "-", &[t])),
            },
        };
        Ok((
            TKind::Unary {
                op,
                operand: Box::new(operand),
            },
            ty,
        ))
    }

    fn ternary(
        &mut self,
        cond: &Expr,
        then: &Expr,
        otherwise: &Expr,
    ) -> Result<(TKind, Type), CompileError> {
        let cond = self.expr(cond)?;
        self.require_bool(&cond, "the condition of `?:`")?;
        let then = self.expr(then)?;
        let otherwise = self.expr(otherwise)?;
        let ty = then.ty.unify(&otherwise.ty);
        Ok((
            TKind::Ternary {
                cond: Box::new(cond),
                then: Box::new(then),
                otherwise: Box::new(otherwise),
            },
            ty,
        ))
    }

    fn list(&mut self, items: &[Expr]) -> Result<(TKind, Type), CompileError> {
        let items = items
            .iter()
            .map(|item| self.expr(item))
            .collect::<Result<Vec<_>, _>>()?;
        let element = match items.split_first() {
            None => Type::Dyn,
            Some((first, rest)) => rest
                .iter()
                .fold(first.ty.clone(), |acc, item| acc.unify(&item.ty)),
        };
        Ok((TKind::List(items), Type::list(element)))
    }

    fn has(
        &mut self,
        target: &Expr,
        field: &str,
        span: Span,
    ) -> Result<(TKind, Type), CompileError> {
        let target = self.expr(target)?;
        if !target.ty.may_be(Type::is_map_like) {
            return Err(type_error(
                span,
                format!("`has` needs a map or record, found {}", target.ty),
            ));
        }
        Ok((
            TKind::Has {
                target: Box::new(target),
                key: Key::new(field),
            },
            Type::Bool,
        ))
    }

    fn require_bool(&self, e: &TExpr, what: &str) -> Result<(), CompileError> {
        if e.ty.may_be(|t| *t == Type::Bool) {
            Ok(())
        } else {
            Err(type_error(
                e.span,
                format!("{what} needs a bool, found {}", e.ty),
            ))
        }
    }

    fn ident(&mut self, name: &str, span: Span) -> Result<(TKind, Type), CompileError> {
        if let Some((i, (_, ty))) = self
            .locals
            .iter()
            .enumerate()
            .rev()
            .find(|(_, (n, _))| n == name)
        {
            return Ok((TKind::Local(to_u32(i)), ty.clone()));
        }
        let ty = match self.schema.get(name) {
            Some(t) => t.clone(),
            None if self.schema.is_declared_only() => {
                return Err(CompileError::new(
                    K::UndeclaredVariable(name.to_owned()),
                    span,
                ))
            }
            None => Type::Dyn,
        };
        let next = to_u32(self.vars.len());
        let slot = *self.slots.entry(name.to_owned()).or_insert(next);
        if slot == next {
            self.vars.push(name.to_owned());
        }
        Ok((TKind::Var(slot), ty))
    }

    /// The type of `target.field`.
    fn select(&self, target: &Type, field: &str, span: Span) -> Result<Type, CompileError> {
        match target {
            Type::Record(r) => Ok(r.field(field).cloned().unwrap_or(Type::Dyn)),
            Type::Map(v) => Ok((**v).clone()),
            Type::Dyn => Ok(Type::Dyn),
            t => Err(type_error(
                span,
                format!("{t} has no fields (selecting `.{field}`)"),
            )),
        }
    }

    fn index(
        &mut self,
        target: &Expr,
        index: &Expr,
        span: Span,
    ) -> Result<(TKind, Type), CompileError> {
        let target = self.expr(target)?;
        let index = self.expr(index)?;
        let is_string = index.ty.may_be(|t| *t == Type::String);
        let ty = match &target.ty {
            Type::List(t) if index.ty.may_be(|t| *t == Type::Int) => (**t).clone(),
            Type::Map(v) if is_string => (**v).clone(),
            Type::Record(r) if is_string => match &index.kind {
                TKind::Const(Value::String(k)) => r.field(k).cloned().unwrap_or(Type::Dyn),
                _ => Type::Dyn,
            },
            Type::Dyn if index.ty.may_be(|t| matches!(t, Type::Int | Type::String)) => Type::Dyn,
            t => return Err(no_overload(span, "[]", &[t, &index.ty])),
        };
        // A literal key is a field access: hashed now, not at every evaluation.
        if let TKind::Const(Value::String(k)) = &index.kind {
            let key = Key::new(k.clone());
            return Ok((
                TKind::Field {
                    target: Box::new(target),
                    key,
                },
                ty,
            ));
        }
        Ok((
            TKind::Index {
                target: Box::new(target),
                index: Box::new(index),
            },
            ty,
        ))
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        lhs: &Expr,
        rhs: &Expr,
        span: Span,
    ) -> Result<(TKind, Type), CompileError> {
        let lhs = self.expr(lhs)?;
        let rhs = self.expr(rhs)?;
        let (l, r) = (&lhs.ty, &rhs.ty);
        let ty = match op {
            BinaryOp::And | BinaryOp::Or => {
                let what = format!("`{}`", op.symbol());
                self.require_bool(&lhs, &what)?;
                self.require_bool(&rhs, &what)?;
                Type::Bool
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Rem => {
                arith_type(op, l, r).ok_or_else(|| no_overload(span, op.symbol(), &[l, r]))?
            }
            BinaryOp::Eq | BinaryOp::Ne if eq_compatible(l, r) => Type::Bool,
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge if ord_compatible(l, r) => {
                Type::Bool
            }
            BinaryOp::In if in_compatible(l, r) => Type::Bool,
            _ => return Err(no_overload(span, op.symbol(), &[l, r])),
        };
        Ok((
            TKind::Binary {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
            ty,
        ))
    }

    fn map_literal(&mut self, entries: &[(Expr, Expr)]) -> Result<(TKind, Type), CompileError> {
        let mut checked = Vec::with_capacity(entries.len());
        let mut literal_keys = std::collections::HashSet::new();
        let mut value_ty: Option<Type> = None;
        for (k, v) in entries {
            let k = self.expr(k)?;
            if !k.ty.may_be(|t| *t == Type::String) {
                return Err(type_error(
                    k.span,
                    format!("map keys are strings, found {}", k.ty),
                ));
            }
            if let TKind::Const(Value::String(s)) = &k.kind {
                if !literal_keys.insert(s.clone()) {
                    return Err(type_error(k.span, format!("duplicate map key {s:?}")));
                }
            }
            let v = self.expr(v)?;
            value_ty = Some(match value_ty {
                None => v.ty.clone(),
                Some(t) => t.unify(&v.ty),
            });
            checked.push((k, v));
        }
        Ok((
            TKind::Map(checked),
            Type::map(value_ty.unwrap_or(Type::Dyn)),
        ))
    }

    fn comprehension(
        &mut self,
        kind: Macro,
        range: &Expr,
        var: &str,
        body: &Expr,
    ) -> Result<(TKind, Type), CompileError> {
        let range = self.expr(range)?;
        let element = match &range.ty {
            Type::List(t) => (**t).clone(),
            Type::Map(_) | Type::Record(_) => Type::String,
            Type::Dyn => Type::Dyn,
            t => {
                return Err(type_error(
                    range.span,
                    format!("`{}` needs a list or map, found {t}", kind.name()),
                ))
            }
        };
        let local = to_u32(self.locals.len());
        self.locals.push((var.to_owned(), element.clone()));
        let body = self.expr(body);
        self.locals.pop();
        let body = body?;
        let ty = match kind {
            Macro::All | Macro::Exists => {
                self.require_bool(&body, &format!("the predicate of `{}`", kind.name()))?;
                Type::Bool
            }
            Macro::Map => Type::list(body.ty.clone()),
            Macro::Filter => {
                self.require_bool(&body, "the predicate of `filter`")?;
                Type::list(element)
            }
        };
        Ok((
            TKind::Loop {
                kind,
                range: Box::new(range),
                local,
                body: Box::new(body),
            },
            ty,
        ))
    }

    fn call(
        &mut self,
        name: &str,
        target: Option<&Expr>,
        args: &[Expr],
        span: Span,
    ) -> Result<(TKind, Type), CompileError> {
        let exprs: Vec<&Expr> = target.into_iter().chain(args).collect();
        if name == "matches" {
            return self.matches(&exprs, span);
        }
        let Some(func) = Builtin::from_name(name) else {
            return Err(CompileError::new(K::UnknownFunction(name.to_owned()), span));
        };
        if exprs.len() != func.arity() {
            return Err(CompileError::new(
                K::WrongArity {
                    name: name.to_owned(),
                    expected: func.arity(),
                    found: exprs.len(),
                },
                span,
            ));
        }
        let args = exprs
            .iter()
            .map(|e| self.expr(e))
            .collect::<Result<Vec<_>, _>>()?;
        let ty = builtin_type(func, &args, span)?;
        check_literal_conversion(func, &args)?;
        Ok((TKind::Call { func, args }, ty))
    }

    fn matches(&mut self, exprs: &[&Expr], span: Span) -> Result<(TKind, Type), CompileError> {
        let [target, pattern] = exprs else {
            return Err(CompileError::new(
                K::WrongArity {
                    name: "matches".into(),
                    expected: 2,
                    found: exprs.len(),
                },
                span,
            ));
        };
        let target = self.expr(target)?;
        if !target.ty.may_be(|t| *t == Type::String) {
            return Err(no_overload(span, "matches", &[&target.ty, &Type::String]));
        }
        let ExprKind::String(source) = &pattern.kind else {
            return Err(CompileError::new(K::NonLiteralPattern, pattern.span));
        };
        if self.regexes >= self.limits.regexes_max {
            return Err(CompileError::new(
                K::TooManyRegexes {
                    max: self.limits.regexes_max,
                },
                pattern.span,
            ));
        }
        let regex = build_regex(source, pattern.span, self.limits)?;
        self.regexes += 1;
        Ok((
            TKind::Matches {
                target: Box::new(target),
                regex: Box::new(regex),
            },
            Type::Bool,
        ))
    }
}

fn literal(kind: &ExprKind) -> (TKind, Type) {
    let (value, ty) = match kind {
        ExprKind::Bool(b) => (Value::Bool(*b), Type::Bool),
        ExprKind::Int(i) => (Value::Int(*i), Type::Int),
        ExprKind::Float(f) => (Value::Float(*f), Type::Float),
        ExprKind::String(s) => (Value::string(s.as_str()), Type::String),
        ExprKind::Bytes(b) => (Value::bytes(b.as_slice()), Type::Bytes),
        _ => (Value::Null, Type::Null),
    };
    (TKind::Const(value), ty)
}

fn builtin_type(func: Builtin, args: &[TExpr], span: Span) -> Result<Type, CompileError> {
    let is =
        |i: usize, pred: &dyn Fn(&Type) -> bool| args.get(i).is_some_and(|a| a.ty.may_be(pred));
    let string = |t: &Type| *t == Type::String;
    let (ok, ty) = match func {
        Builtin::Size => (
            is(0, &|t| {
                matches!(t, Type::String | Type::Bytes | Type::List(_)) || t.is_map_like()
            }),
            Type::Int,
        ),
        Builtin::Contains | Builtin::StartsWith | Builtin::EndsWith => {
            (is(0, &string) && is(1, &string), Type::Bool)
        }
        Builtin::Lower | Builtin::Upper => (is(0, &string), Type::String),
        Builtin::Int => (
            is(0, &|t| matches!(t, Type::Int | Type::Float | Type::String)),
            Type::Int,
        ),
        Builtin::Float => (
            is(0, &|t| matches!(t, Type::Int | Type::Float | Type::String)),
            Type::Float,
        ),
        Builtin::String => (
            is(0, &|t| !matches!(t, Type::List(_)) && !t.is_map_like()),
            Type::String,
        ),
        Builtin::Bytes => (
            is(0, &|t| matches!(t, Type::String | Type::Bytes)),
            Type::Bytes,
        ),
        Builtin::Timestamp => (
            is(0, &|t| matches!(t, Type::String | Type::Time)),
            Type::Time,
        ),
        Builtin::Duration => (
            is(0, &|t| matches!(t, Type::String | Type::Duration)),
            Type::Duration,
        ),
    };
    if ok {
        Ok(ty)
    } else {
        let types: Vec<&Type> = args.iter().map(|a| &a.ty).collect();
        Err(no_overload(span, func.name(), &types))
    }
}

/// A conversion of a literal that can only fail is refused now rather than at every
/// evaluation; one that succeeds is folded by the compiler.
fn check_literal_conversion(func: Builtin, args: &[TExpr]) -> Result<(), CompileError> {
    let [TExpr {
        kind: TKind::Const(arg),
        span,
        ..
    }] = args
    else {
        return Ok(());
    };
    let ok = match (func, arg) {
        (Builtin::Timestamp, Value::String(s)) => crate::time::parse_rfc3339(s).is_some(),
        (Builtin::Duration, Value::String(s)) => crate::time::parse_duration(s).is_some(),
        (Builtin::Int, Value::String(s)) => s.parse::<i64>().is_ok(),
        (Builtin::Int, Value::Float(f)) => float_to_int(*f).is_some(),
        (Builtin::Float, Value::String(s)) => s.parse::<f64>().is_ok(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(CompileError::new(
            K::InvalidLiteral(format!("{}({arg}) cannot succeed", func.name())),
            *span,
        ))
    }
}
