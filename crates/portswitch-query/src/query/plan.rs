//! Preparing a statement: names resolved, virtual fields expanded, aggregates and group
//! keys separated, WHERE split by the FROM item each conjunct needs, push-down hints
//! extracted, every expression compiled.

use std::collections::HashMap;
use std::sync::Arc;

use crate::ast::{BinaryOp, Expr, ExprKind, FromSource, JoinKind, Select};
use crate::error::{CompileError, CompileErrorKind as K, Span};
use crate::limits::Limits;
use crate::parser::{parse, parse_select};
use crate::program::{Bindings, Program, Slot};
use crate::types::{Schema, Type};
use crate::value::Value;

use super::{Catalog, CmpOp, Pushed, QueryError, QueryLimits, Scan, VIRTUAL_DEPTH_MAX};

/// A prepared statement: compile once, run many times (from any thread).
#[derive(Debug)]
pub struct Query {
    pub(super) text: Arc<str>,
    pub(super) scans: Vec<Scan>,
    pub(super) levels: Vec<Level>,
    pub(super) output: Output,
    pub(super) columns: Vec<String>,
    pub(super) star: bool,
    pub(super) distinct: bool,
    pub(super) order: Vec<(OrderKey, bool)>,
    pub(super) limit: Option<u64>,
    pub(super) offset: u64,
    pub(super) limits: QueryLimits,
}

impl Query {
    /// Parses, checks and compiles `text` against `catalog`.
    pub fn prepare(
        text: &str,
        catalog: &Catalog,
        limits: &QueryLimits,
    ) -> Result<Query, QueryError> {
        let stmt = parse_select(text, &limits.expr).map_err(|e| e.locate(text))?;
        let text: Arc<str> = text.into();
        Planner {
            text: text.clone(),
            limits,
            aliases: Vec::new(),
            virtuals: Vec::new(),
        }
        .plan(stmt, catalog)
        .map_err(|e| match e {
            QueryError::Compile(e) => QueryError::Compile(e.locate(&text)),
            other => other,
        })
    }

    /// The result's column names, in order. For `SELECT *`, the FROM aliases.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Whether the statement is `SELECT *` (each result row holds the row of every FROM
    /// item, under its alias).
    pub fn is_star(&self) -> bool {
        self.star
    }

    /// The sources the query reads, with the fields it needs and the conditions the
    /// source may apply itself.
    pub fn scans(&self) -> &[Scan] {
        &self.scans
    }

    /// The statement's source.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// A compiled expression over a row of values, with the slots of the names it reads.
#[derive(Debug)]
pub(super) struct RowProgram {
    pub program: Program,
    slots: Vec<(usize, Slot)>,
}

impl RowProgram {
    fn new(
        expr: &Expr,
        text: &Arc<str>,
        names: &[String],
        types: &[Type],
        limits: &Limits,
    ) -> Result<RowProgram, CompileError> {
        let mut schema = Schema::new().declared_only();
        for (name, ty) in names.iter().zip(types) {
            schema.insert(name.clone(), ty.clone());
        }
        let program = Program::from_expr(expr, text.clone(), &schema, limits)?;
        let slots = names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| program.slot(n).map(|s| (i, s)))
            .collect();
        Ok(RowProgram { program, slots })
    }

    /// Bindings for one row (`row[i]` is the value of name `i`).
    #[inline]
    pub fn bind<'a>(&'a self, row: &'a [Value]) -> Bindings<'a> {
        let mut b = self.program.bindings();
        for &(i, slot) in &self.slots {
            if let Some(v) = row.get(i) {
                b.set_slot(slot, v);
            }
        }
        b
    }
}

/// What a FROM item ranges over, compiled.
#[derive(Debug)]
pub(super) enum LevelSource {
    /// The first item: scans[index].
    Scan(usize),
    /// A list computed from the earlier items.
    Unnest(RowProgram),
    /// Another source, held in memory; `hash` = (key over earlier items, key over this
    /// item) when an equality of the two sides joins them.
    Join {
        scan: usize,
        hash: Option<(RowProgram, RowProgram)>,
    },
}

#[derive(Debug)]
pub(super) struct Level {
    pub source: LevelSource,
    pub join: JoinKind,
    /// LEFT JOIN's match condition.
    pub on: Option<RowProgram>,
    /// Conditions that need this item and none after it (ON of an inner join included).
    pub filter: Option<RowProgram>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AggFunc {
    CountRows,
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

#[derive(Debug)]
pub(super) struct AggPlan {
    pub func: AggFunc,
    pub arg: Option<RowProgram>,
    pub span: Span,
}

#[derive(Debug)]
pub(super) enum Output {
    /// One result row per joined row.
    Rows(Vec<RowProgram>),
    /// One result row per group; `items` and `having` read the group's keys and
    /// aggregates (`$g0…`, `$a0…`).
    Groups {
        keys: Vec<RowProgram>,
        aggs: Vec<AggPlan>,
        items: Vec<RowProgram>,
        having: Option<RowProgram>,
    },
}

#[derive(Debug)]
pub(super) enum OrderKey {
    /// A result column.
    Column(usize),
    /// An expression over the joined row (ungrouped) or the group (grouped).
    Expr(RowProgram),
}

struct Planner<'l> {
    text: Arc<str>,
    limits: &'l QueryLimits,
    aliases: Vec<String>,
    /// Per alias: its virtual fields, parsed.
    virtuals: Vec<HashMap<String, Expr>>,
}

const AGGREGATES: [&str; 5] = ["count", "sum", "min", "max", "avg"];

fn statement(message: impl Into<String>, span: Span) -> CompileError {
    CompileError::new(K::Statement(message.into()), span)
}

fn ident(name: impl Into<String>, span: Span) -> Expr {
    Expr {
        kind: ExprKind::Ident(name.into()),
        span,
    }
}

/// A rewriting step: sees a node and the loop variables in scope; may replace it.
type Rewriter<'f> = dyn FnMut(&Expr, &[String]) -> Result<Option<Expr>, CompileError> + 'f;
/// A visiting step: returns true to skip the node's children.
type Visitor<'f> = dyn FnMut(&Expr, &[String]) -> Result<bool, CompileError> + 'f;

/// Rewrites `e` top-down: `f` sees each node (with the loop variables in scope) and may
/// replace it, else its children are visited.
fn rewrite(e: &Expr, locals: &mut Vec<String>, f: &mut Rewriter<'_>) -> Result<Expr, CompileError> {
    if let Some(replaced) = f(e, locals)? {
        return Ok(replaced);
    }
    let mut go = |x: &Expr, locals: &mut Vec<String>| rewrite(x, locals, f).map(Box::new);
    let kind = match &e.kind {
        ExprKind::Member { target, field } => ExprKind::Member {
            target: go(target, locals)?,
            field: field.clone(),
        },
        ExprKind::Index { target, index } => ExprKind::Index {
            target: go(target, locals)?,
            index: go(index, locals)?,
        },
        ExprKind::Call { function, args } => ExprKind::Call {
            function: function.clone(),
            args: args
                .iter()
                .map(|a| go(a, locals).map(|b| *b))
                .collect::<Result<_, _>>()?,
        },
        ExprKind::Method {
            target,
            method,
            args,
        } => ExprKind::Method {
            target: go(target, locals)?,
            method: method.clone(),
            args: args
                .iter()
                .map(|a| go(a, locals).map(|b| *b))
                .collect::<Result<_, _>>()?,
        },
        ExprKind::Unary { op, operand } => ExprKind::Unary {
            op: *op,
            operand: go(operand, locals)?,
        },
        ExprKind::Binary { op, lhs, rhs } => ExprKind::Binary {
            op: *op,
            lhs: go(lhs, locals)?,
            rhs: go(rhs, locals)?,
        },
        ExprKind::Ternary {
            cond,
            then,
            otherwise,
        } => ExprKind::Ternary {
            cond: go(cond, locals)?,
            then: go(then, locals)?,
            otherwise: go(otherwise, locals)?,
        },
        ExprKind::List(items) => ExprKind::List(
            items
                .iter()
                .map(|a| go(a, locals).map(|b| *b))
                .collect::<Result<_, _>>()?,
        ),
        ExprKind::Map(entries) => ExprKind::Map(
            entries
                .iter()
                .map(|(k, v)| Ok((*go(k, locals)?, *go(v, locals)?)))
                .collect::<Result<_, CompileError>>()?,
        ),
        ExprKind::Comprehension {
            kind,
            range,
            var,
            body,
        } => {
            let range = go(range, locals)?;
            locals.push(var.clone());
            let body = go(body, locals);
            locals.pop();
            ExprKind::Comprehension {
                kind: *kind,
                range,
                var: var.clone(),
                body: body?,
            }
        }
        ExprKind::Has { target, field } => ExprKind::Has {
            target: go(target, locals)?,
            field: field.clone(),
        },
        leaf => leaf.clone(),
    };
    Ok(Expr { kind, span: e.span })
}

/// Visits every node of `e` (read-only `rewrite`).
fn visit(e: &Expr, f: &mut Visitor<'_>) -> Result<(), CompileError> {
    rewrite(e, &mut Vec::new(), &mut |x, locals| {
        Ok(if f(x, locals)? { Some(x.clone()) } else { None })
    })
    .map(drop)
}

fn aggregate_name(e: &Expr) -> Option<&str> {
    match &e.kind {
        ExprKind::Call { function, .. } if AGGREGATES.contains(&function.as_str()) => {
            Some(function)
        }
        _ => None,
    }
}

fn has_aggregate(e: &Expr) -> Result<bool, CompileError> {
    let mut found = false;
    visit(e, &mut |x, _| {
        found |= aggregate_name(x).is_some();
        Ok(found)
    })?;
    Ok(found)
}

fn refuse_aggregate(e: &Expr, clause: &str) -> Result<(), CompileError> {
    visit(e, &mut |x, _| match aggregate_name(x) {
        Some(name) => Err(CompileError::new(
            K::MisplacedAggregate(format!("{name}` in `{clause}")),
            x.span,
        )),
        None => Ok(false),
    })
}

/// `a && b && c` as `[a, b, c]`.
fn conjuncts(e: Expr, out: &mut Vec<Expr>) {
    match e.kind {
        ExprKind::Binary {
            op: BinaryOp::And,
            lhs,
            rhs,
        } => {
            conjuncts(*lhs, out);
            conjuncts(*rhs, out);
        }
        kind => out.push(Expr { kind, span: e.span }),
    }
}

fn and_all(mut parts: Vec<Expr>) -> Option<Expr> {
    let first = if parts.is_empty() {
        return None;
    } else {
        parts.remove(0)
    };
    Some(parts.into_iter().fold(first, |lhs, rhs| {
        let span = lhs.span.to(rhs.span);
        Expr {
            kind: ExprKind::Binary {
                op: BinaryOp::And,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
            span,
        }
    }))
}

fn literal_value(e: &Expr) -> Option<Value> {
    Some(match &e.kind {
        ExprKind::Null => Value::Null,
        ExprKind::Bool(b) => Value::Bool(*b),
        ExprKind::Int(i) => Value::Int(*i),
        ExprKind::Float(f) => Value::Float(*f),
        ExprKind::String(s) => Value::from(s.as_str()),
        ExprKind::Bytes(b) => Value::from(b.as_slice()),
        _ => return None,
    })
}

impl Planner<'_> {
    fn alias_index(&self, name: &str, locals: &[String]) -> Option<usize> {
        if locals.iter().any(|l| l == name) {
            return None;
        }
        self.aliases.iter().position(|a| a == name)
    }

    /// The FROM items `e` reads.
    fn references(&self, e: &Expr) -> Result<Vec<usize>, CompileError> {
        let mut seen = Vec::new();
        visit(e, &mut |x, locals| {
            if let ExprKind::Ident(name) = &x.kind {
                if let Some(i) = self.alias_index(name, locals) {
                    if !seen.contains(&i) {
                        seen.push(i);
                    }
                }
            }
            Ok(false)
        })?;
        Ok(seen)
    }

    /// Replaces `alias.v` by virtual field `v`'s expression over that alias.
    fn expand(&self, e: &Expr) -> Result<Expr, CompileError> {
        self.expand_depth(e, 0)
    }

    fn expand_depth(&self, e: &Expr, depth: usize) -> Result<Expr, CompileError> {
        rewrite(e, &mut Vec::new(), &mut |x, locals| {
            let ExprKind::Member { target, field } = &x.kind else {
                return Ok(None);
            };
            let ExprKind::Ident(name) = &target.kind else {
                return Ok(None);
            };
            let Some(i) = self.alias_index(name, locals) else {
                return Ok(None);
            };
            let Some(def) = self.virtuals.get(i).and_then(|v| v.get(field)) else {
                return Ok(None);
            };
            if depth >= VIRTUAL_DEPTH_MAX {
                return Err(CompileError::new(
                    K::VirtualCycle(format!("{name}.{field}")),
                    x.span,
                ));
            }
            // The definition's free names are the row's fields: `f.<name>`; every node
            // takes the span of the use, so that errors point at it.
            let span = x.span;
            let over_alias = rewrite(def, &mut Vec::new(), &mut |d, inner| {
                Ok(match &d.kind {
                    ExprKind::Ident(n) if !inner.contains(n) => Some(Expr {
                        kind: ExprKind::Member {
                            target: Box::new(ident(name.clone(), span)),
                            field: n.clone(),
                        },
                        span,
                    }),
                    _ => None,
                })
            })?;
            self.expand_depth(&with_span(over_alias, span), depth + 1)
                .map(Some)
        })
    }

    fn plan(mut self, stmt: Select, catalog: &Catalog) -> Result<Query, QueryError> {
        let limits = &self.limits.expr;
        // FROM: names, sources, virtual fields.
        let mut scans = Vec::new();
        let mut named_info = Vec::new();
        for item in &stmt.from {
            if self.aliases.contains(&item.alias) {
                return Err(
                    CompileError::new(K::DuplicateAlias(item.alias.clone()), item.span).into(),
                );
            }
            let mut virtuals = HashMap::new();
            let mut row_type = None;
            if let FromSource::Named { name, args } = &item.source {
                let info = catalog
                    .get(name)
                    .ok_or_else(|| CompileError::new(K::UnknownSource(name.clone()), item.span))?;
                for (field, def) in &info.virtuals {
                    let parsed = parse(def, limits).map_err(|error| QueryError::Virtual {
                        field: format!("{name}.{field}"),
                        error: error.locate(def),
                    })?;
                    virtuals.insert(field.clone(), parsed);
                }
                let args = args
                    .iter()
                    .map(|a| {
                        literal_value(a).ok_or_else(|| {
                            statement("a source's arguments must be literals", a.span)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                row_type = Some(info.row.clone());
                scans.push(Scan {
                    name: name.clone(),
                    args,
                    alias: item.alias.clone(),
                    fields: None,
                    filters: Vec::new(),
                });
            } else if self.aliases.is_empty() {
                return Err(statement("the first FROM item must be a source", item.span).into());
            }
            named_info.push(row_type);
            self.aliases.push(item.alias.clone());
            self.virtuals.push(virtuals);
        }

        // Expand virtual fields everywhere, and resolve output names.
        let items: Vec<(Expr, Option<String>)> = stmt
            .items
            .iter()
            .map(|it| Ok((self.expand(&it.expr)?, it.alias.clone())))
            .collect::<Result<_, CompileError>>()?;
        let columns = if stmt.star.is_some() {
            self.aliases.clone()
        } else {
            column_names(&items)
        };
        let filter = stmt.filter.as_ref().map(|e| self.expand(e)).transpose()?;
        let having = stmt.having.as_ref().map(|e| self.expand(e)).transpose()?;
        let mut group_by = Vec::new();
        for g in &stmt.group_by {
            // `GROUP BY name` may name a result column.
            let g = match &g.kind {
                ExprKind::Ident(n) if self.alias_index(n, &[]).is_none() => {
                    match columns.iter().position(|c| c == n) {
                        Some(i) if stmt.star.is_none() => items[i].0.clone(),
                        _ => g.clone(),
                    }
                }
                _ => g.clone(),
            };
            let g = self.expand(&g)?;
            refuse_aggregate(&g, "GROUP BY")?;
            group_by.push(g);
        }
        let order_exprs: Vec<(Expr, bool)> = stmt
            .order_by
            .iter()
            .map(|o| Ok((self.expand(&o.expr)?, o.descending)))
            .collect::<Result<_, CompileError>>()?;
        if let Some(f) = &filter {
            refuse_aggregate(f, "WHERE")?;
        }

        // Row types, level by level (an unnested item's type is its list's element
        // type), and each level's own expressions.
        let n = self.aliases.len();
        let mut types: Vec<Type> = Vec::with_capacity(n);
        let mut level_on: Vec<Vec<Expr>> = vec![Vec::new(); n];
        let mut level_filter: Vec<Vec<Expr>> = vec![Vec::new(); n];
        let mut unnest_ranges: Vec<Option<Expr>> = Vec::with_capacity(n);
        for (i, item) in stmt.from.iter().enumerate() {
            let range = match &item.source {
                FromSource::Unnest(path) => {
                    let path = self.expand(path)?;
                    refuse_aggregate(&path, "FROM")?;
                    let refs = self.references(&path)?;
                    if refs.iter().any(|&r| r >= i) {
                        return Err(statement(
                            "a list in FROM may only read earlier items",
                            path.span,
                        )
                        .into());
                    }
                    let program =
                        RowProgram::new(&path, &self.text, &self.aliases[..i], &types, limits)?;
                    let element = match program.program.result_type() {
                        Type::List(t) => (**t).clone(),
                        _ => Type::Dyn,
                    };
                    types.push(if item.join == JoinKind::Left {
                        Type::Dyn
                    } else {
                        element
                    });
                    Some(path)
                }
                FromSource::Named { .. } => {
                    let t = named_info[i].clone().unwrap_or(Type::Dyn);
                    types.push(if item.join == JoinKind::Left {
                        Type::Dyn
                    } else {
                        t
                    });
                    None
                }
            };
            unnest_ranges.push(range);
            if let Some(on) = &item.on {
                let on = self.expand(on)?;
                refuse_aggregate(&on, "ON")?;
                let refs = self.references(&on)?;
                if refs.iter().any(|&r| r > i) {
                    return Err(
                        statement("ON may only read its item and earlier ones", on.span).into(),
                    );
                }
                let mut parts = Vec::new();
                conjuncts(on, &mut parts);
                match item.join {
                    JoinKind::Left => level_on[i].extend(parts),
                    JoinKind::Inner => level_filter[i].extend(parts),
                }
            }
        }
        if let Some(f) = filter {
            let mut parts = Vec::new();
            conjuncts(f, &mut parts);
            for p in parts {
                let level = self.references(&p)?.into_iter().max().unwrap_or(0);
                level_filter[level].push(p);
            }
        }

        // Push-down: conditions and fields per scanned source.
        let mut scan_of_level = vec![None; n];
        let mut next_scan = 0;
        for (i, item) in stmt.from.iter().enumerate() {
            if let FromSource::Named { .. } = item.source {
                scan_of_level[i] = Some(next_scan);
                next_scan += 1;
            }
        }
        for (i, item) in stmt.from.iter().enumerate() {
            let Some(s) = scan_of_level[i] else { continue };
            if item.join == JoinKind::Inner {
                for p in &level_filter[i] {
                    if let Some(pushed) = self.pushable(p, i) {
                        scans[s].filters.push(pushed);
                    }
                }
            }
        }
        let mut all_exprs: Vec<&Expr> = Vec::new();
        all_exprs.extend(items.iter().map(|(e, _)| e));
        all_exprs.extend(group_by.iter());
        all_exprs.extend(having.iter());
        all_exprs.extend(order_exprs.iter().map(|(e, _)| e));
        all_exprs.extend(level_on.iter().flatten());
        all_exprs.extend(level_filter.iter().flatten());
        all_exprs.extend(unnest_ranges.iter().flatten());
        for (i, s) in scan_of_level.iter().enumerate() {
            let Some(s) = *s else { continue };
            scans[s].fields = if stmt.star.is_some() {
                None
            } else {
                self.fields_read(i, &all_exprs)?
            };
        }

        // Compile the levels.
        let names = &self.aliases;
        let compile = |e: &Expr| RowProgram::new(e, &self.text, names, &types, limits);
        let mut levels = Vec::with_capacity(n);
        for (i, item) in stmt.from.iter().enumerate() {
            let source = match (&unnest_ranges[i], scan_of_level[i]) {
                (Some(range), _) => LevelSource::Unnest(compile(range)?),
                (None, Some(s)) if i == 0 => LevelSource::Scan(s),
                (None, Some(s)) => {
                    let hash = self.hash_keys(i, &level_on[i], &level_filter[i], item.join)?;
                    let hash = match hash {
                        Some((outer, inner)) => Some((compile(&outer)?, compile(&inner)?)),
                        None => None,
                    };
                    LevelSource::Join { scan: s, hash }
                }
                (None, None) => unreachable!("every FROM item is a source or a list"),
            };
            levels.push(Level {
                source,
                join: item.join,
                on: and_all(level_on[i].clone())
                    .map(|e| compile(&e))
                    .transpose()?,
                filter: and_all(level_filter[i].clone())
                    .map(|e| compile(&e))
                    .transpose()?,
            });
        }

        // Output.
        let grouped = !group_by.is_empty()
            || items
                .iter()
                .map(|(e, _)| e)
                .chain(having.iter())
                .try_fold(false, |acc, e| has_aggregate(e).map(|h| acc || h))?;
        if !grouped {
            if let Some(h) = &having {
                return Err(statement("HAVING needs GROUP BY or an aggregate", h.span).into());
            }
        }
        let mut order = Vec::new();
        let output = if grouped {
            if stmt.star.is_some() {
                return Err(statement("SELECT * cannot be grouped", stmt.span).into());
            }
            let keys_norm: Vec<Expr> = group_by.iter().map(Expr::without_spans).collect();
            let mut aggs: Vec<(AggFunc, Option<Expr>, Span)> = Vec::new();
            let mut post = |e: &Expr| self.post_rewrite(e, &keys_norm, &mut aggs);
            let item_exprs: Vec<Expr> = items
                .iter()
                .map(|(e, _)| post(e))
                .collect::<Result<_, _>>()?;
            let having = having.as_ref().map(&mut post).transpose()?;
            let mut order_post = Vec::new();
            for (e, desc) in &order_exprs {
                match self.column_ref(e, &columns, &items) {
                    Some(c) => order_post.push((None, Some(c), *desc)),
                    None => order_post.push((Some(post(e)?), None, *desc)),
                }
            }
            let key_programs = group_by
                .iter()
                .map(compile)
                .collect::<Result<Vec<_>, _>>()?;
            let mut post_names = Vec::new();
            let mut post_types = Vec::new();
            for (i, k) in key_programs.iter().enumerate() {
                post_names.push(format!("$g{i}"));
                post_types.push(k.program.result_type().clone());
            }
            let mut agg_plans = Vec::new();
            for (j, (func, arg, span)) in aggs.iter().enumerate() {
                let arg = arg.as_ref().map(compile).transpose()?;
                post_names.push(format!("$a{j}"));
                // Counts are ints; the others are null over no rows (and sums int or
                // float by what they add), so `dyn`.
                post_types.push(match func {
                    AggFunc::CountRows | AggFunc::Count => Type::Int,
                    _ => Type::Dyn,
                });
                agg_plans.push(AggPlan {
                    func: *func,
                    arg,
                    span: *span,
                });
            }
            let post_compile =
                |e: &Expr| RowProgram::new(e, &self.text, &post_names, &post_types, limits);
            for (e, c, desc) in order_post {
                order.push(match (e, c) {
                    (_, Some(c)) => (OrderKey::Column(c), desc),
                    (Some(e), None) => (OrderKey::Expr(post_compile(&e)?), desc),
                    (None, None) => unreachable!(),
                });
            }
            Output::Groups {
                keys: key_programs,
                aggs: agg_plans,
                items: item_exprs
                    .iter()
                    .map(post_compile)
                    .collect::<Result<_, _>>()?,
                having: having.as_ref().map(post_compile).transpose()?,
            }
        } else {
            for (e, desc) in &order_exprs {
                refuse_aggregate(e, "ORDER BY")?;
                order.push(match self.column_ref(e, &columns, &items) {
                    Some(c) if stmt.star.is_none() => (OrderKey::Column(c), *desc),
                    _ => (OrderKey::Expr(compile(e)?), *desc),
                });
            }
            Output::Rows(
                items
                    .iter()
                    .map(|(e, _)| compile(e))
                    .collect::<Result<_, _>>()?,
            )
        };
        Ok(Query {
            text: self.text.clone(),
            scans,
            levels,
            output,
            columns,
            star: stmt.star.is_some(),
            distinct: stmt.distinct,
            order,
            limit: stmt.limit.map(|l| l.0),
            offset: stmt.offset.map_or(0, |o| o.0),
            limits: self.limits.clone(),
        })
    }

    /// `ORDER BY name` naming a result column, or an expression that is one.
    fn column_ref(
        &self,
        e: &Expr,
        columns: &[String],
        items: &[(Expr, Option<String>)],
    ) -> Option<usize> {
        if let ExprKind::Ident(n) = &e.kind {
            if self.alias_index(n, &[]).is_none() {
                if let Some(i) = columns.iter().position(|c| c == n) {
                    return Some(i);
                }
            }
        }
        let norm = e.without_spans();
        items.iter().position(|(x, _)| x.without_spans() == norm)
    }

    /// An expression of a grouped query's output, over the group: GROUP BY expressions
    /// become `$gN`, aggregates `$aN`; any other read of a row is an error.
    fn post_rewrite(
        &self,
        e: &Expr,
        keys: &[Expr],
        aggs: &mut Vec<(AggFunc, Option<Expr>, Span)>,
    ) -> Result<Expr, CompileError> {
        rewrite(e, &mut Vec::new(), &mut |x, locals| {
            let norm = x.without_spans();
            if let Some(i) = keys.iter().position(|k| *k == norm) {
                return Ok(Some(ident(format!("$g{i}"), x.span)));
            }
            if let ExprKind::Call { function, args } = &x.kind {
                if AGGREGATES.contains(&function.as_str()) {
                    let func = match (function.as_str(), args.len()) {
                        ("count", 0) => AggFunc::CountRows,
                        ("count", 1) => AggFunc::Count,
                        ("sum", 1) => AggFunc::Sum,
                        ("min", 1) => AggFunc::Min,
                        ("max", 1) => AggFunc::Max,
                        ("avg", 1) => AggFunc::Avg,
                        (name, found) => {
                            return Err(CompileError::new(
                                K::WrongArity {
                                    name: name.to_owned(),
                                    expected: 1,
                                    found,
                                },
                                x.span,
                            ))
                        }
                    };
                    if let Some(arg) = args.first() {
                        refuse_aggregate(arg, "an aggregate")?;
                    }
                    let arg = args.first().cloned();
                    let arg_norm = arg.as_ref().map(Expr::without_spans);
                    let j = match aggs.iter().position(|(f, a, _)| {
                        *f == func && a.as_ref().map(Expr::without_spans) == arg_norm
                    }) {
                        Some(j) => j,
                        None => {
                            aggs.push((func, arg, x.span));
                            aggs.len() - 1
                        }
                    };
                    return Ok(Some(ident(format!("$a{j}"), x.span)));
                }
            }
            if self.alias_path(x, locals) {
                return Err(CompileError::new(K::NotGrouped(x.to_string()), x.span));
            }
            Ok(None)
        })
    }

    /// Whether `e` is `alias`, `alias.f`, `alias["f"]`, `alias.f[0].g`…
    fn alias_path(&self, e: &Expr, locals: &[String]) -> bool {
        match &e.kind {
            ExprKind::Ident(n) => self.alias_index(n, locals).is_some(),
            ExprKind::Member { target, .. } | ExprKind::Index { target, .. } => {
                self.alias_path(target, locals)
            }
            _ => false,
        }
    }

    /// `alias.field op literal` (either way round) as a push-down.
    fn pushable(&self, e: &Expr, level: usize) -> Option<Pushed> {
        let ExprKind::Binary { op, lhs, rhs } = &e.kind else {
            return None;
        };
        let op = match op {
            BinaryOp::Eq => CmpOp::Eq,
            BinaryOp::Lt => CmpOp::Lt,
            BinaryOp::Le => CmpOp::Le,
            BinaryOp::Gt => CmpOp::Gt,
            BinaryOp::Ge => CmpOp::Ge,
            _ => return None,
        };
        let field_of = |x: &Expr| match &x.kind {
            ExprKind::Member { target, field } => match &target.kind {
                ExprKind::Ident(n) if self.alias_index(n, &[]) == Some(level) => {
                    Some(field.clone())
                }
                _ => None,
            },
            _ => None,
        };
        let plain = |v: Value| {
            matches!(
                v,
                Value::Int(_) | Value::Float(_) | Value::String(_) | Value::Bool(_)
            )
            .then_some(v)
        };
        if let (Some(field), Some(value)) = (field_of(lhs), literal_value(rhs).and_then(plain)) {
            return Some(Pushed { field, op, value });
        }
        if let (Some(field), Some(value)) = (field_of(rhs), literal_value(lhs).and_then(plain)) {
            let op = match op {
                CmpOp::Lt => CmpOp::Gt,
                CmpOp::Le => CmpOp::Ge,
                CmpOp::Gt => CmpOp::Lt,
                CmpOp::Ge => CmpOp::Le,
                CmpOp::Eq => CmpOp::Eq,
            };
            return Some(Pushed { field, op, value });
        }
        None
    }

    /// The top-level fields of item `level` that `exprs` read, or `None` if some
    /// expression uses the whole row.
    fn fields_read(
        &self,
        level: usize,
        exprs: &[&Expr],
    ) -> Result<Option<Vec<String>>, CompileError> {
        let mut fields: Vec<String> = Vec::new();
        let mut whole = false;
        for e in exprs {
            visit(e, &mut |x, locals| {
                let mine = |t: &Expr| matches!(&t.kind, ExprKind::Ident(n) if self.alias_index(n, locals) == Some(level));
                let field = match &x.kind {
                    ExprKind::Member { target, field } | ExprKind::Has { target, field }
                        if mine(target) =>
                    {
                        Some(field.clone())
                    }
                    ExprKind::Index { target, index } if mine(target) => match &index.kind {
                        ExprKind::String(s) => Some(s.clone()),
                        _ => {
                            whole = true;
                            return Ok(true);
                        }
                    },
                    ExprKind::Ident(_) if mine(x) => {
                        whole = true;
                        return Ok(true);
                    }
                    _ => None,
                };
                match field {
                    Some(f) => {
                        if !fields.contains(&f) {
                            fields.push(f);
                        }
                        Ok(true)
                    }
                    None => Ok(false),
                }
            })?;
        }
        Ok((!whole).then_some(fields))
    }

    /// For a join with another source: an equality conjunct whose one side reads only
    /// this item and the other only earlier ones.
    fn hash_keys(
        &self,
        level: usize,
        on: &[Expr],
        filter: &[Expr],
        join: JoinKind,
    ) -> Result<Option<(Expr, Expr)>, CompileError> {
        let candidates = match join {
            JoinKind::Left => on,
            JoinKind::Inner => filter,
        };
        for c in candidates {
            let ExprKind::Binary {
                op: BinaryOp::Eq,
                lhs,
                rhs,
            } = &c.kind
            else {
                continue;
            };
            let l = self.references(lhs)?;
            let r = self.references(rhs)?;
            let only_this = |refs: &[usize]| refs == [level];
            let only_before = |refs: &[usize]| !refs.is_empty() && refs.iter().all(|&x| x < level);
            if only_before(&l) && only_this(&r) {
                return Ok(Some(((**lhs).clone(), (**rhs).clone())));
            }
            if only_before(&r) && only_this(&l) {
                return Ok(Some(((**rhs).clone(), (**lhs).clone())));
            }
        }
        Ok(None)
    }
}

fn with_span(mut e: Expr, span: Span) -> Expr {
    e.span = span;
    e.kind = match e.kind {
        ExprKind::Member { target, field } => ExprKind::Member {
            target: Box::new(with_span(*target, span)),
            field,
        },
        ExprKind::Index { target, index } => ExprKind::Index {
            target: Box::new(with_span(*target, span)),
            index: Box::new(with_span(*index, span)),
        },
        ExprKind::Call { function, args } => ExprKind::Call {
            function,
            args: args.into_iter().map(|a| with_span(a, span)).collect(),
        },
        ExprKind::Method {
            target,
            method,
            args,
        } => ExprKind::Method {
            target: Box::new(with_span(*target, span)),
            method,
            args: args.into_iter().map(|a| with_span(a, span)).collect(),
        },
        ExprKind::Unary { op, operand } => ExprKind::Unary {
            op,
            operand: Box::new(with_span(*operand, span)),
        },
        ExprKind::Binary { op, lhs, rhs } => ExprKind::Binary {
            op,
            lhs: Box::new(with_span(*lhs, span)),
            rhs: Box::new(with_span(*rhs, span)),
        },
        ExprKind::Ternary {
            cond,
            then,
            otherwise,
        } => ExprKind::Ternary {
            cond: Box::new(with_span(*cond, span)),
            then: Box::new(with_span(*then, span)),
            otherwise: Box::new(with_span(*otherwise, span)),
        },
        ExprKind::List(items) => {
            ExprKind::List(items.into_iter().map(|a| with_span(a, span)).collect())
        }
        ExprKind::Map(entries) => ExprKind::Map(
            entries
                .into_iter()
                .map(|(k, v)| (with_span(k, span), with_span(v, span)))
                .collect(),
        ),
        ExprKind::Comprehension {
            kind,
            range,
            var,
            body,
        } => ExprKind::Comprehension {
            kind,
            range: Box::new(with_span(*range, span)),
            var,
            body: Box::new(with_span(*body, span)),
        },
        ExprKind::Has { target, field } => ExprKind::Has {
            target: Box::new(with_span(*target, span)),
            field,
        },
        leaf => leaf,
    };
    e
}

/// Result column names: `AS name`, else the last name of a path (`f.Country` →
/// `Country`), else the aggregate's name, else `_N`; repeated names get `_2`, `_3`….
fn column_names(items: &[(Expr, Option<String>)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    for (i, (e, alias)) in items.iter().enumerate() {
        let base = alias.clone().unwrap_or_else(|| match &e.kind {
            ExprKind::Ident(n) => n.clone(),
            ExprKind::Member { field, .. } => field.clone(),
            ExprKind::Index { index, .. } => match &index.kind {
                ExprKind::String(s) => s.clone(),
                _ => format!("_{}", i + 1),
            },
            ExprKind::Call { function, .. } if AGGREGATES.contains(&function.as_str()) => {
                function.clone()
            }
            _ => format!("_{}", i + 1),
        });
        let mut name = base.clone();
        let mut k = 2;
        while names.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        names.push(name);
    }
    names
}
