//! Running a prepared statement: nested loops over the FROM items (the first streamed
//! from its source, lists unnested in place, other sources held in memory and probed by
//! hash when an equality joins them), each condition checked at the first item it
//! needs, then projection, or hash aggregation, then sorting (bounded to LIMIT + OFFSET
//! rows when there is a LIMIT) and the sink.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashTable;

use crate::ast::JoinKind;
use crate::error::{EvalError, EvalErrorKind};
use crate::value::Value;

use super::keys::{hash_values, total_cmp};
use super::plan::{AggFunc, AggPlan, LevelSource, OrderKey, Output, Query, RowProgram};
use super::{QueryError, QueryLimit, Sources};

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Rows read from the first source.
    pub rows_scanned: u64,
    /// Rows examined: source rows, unnested elements and join candidates.
    pub rows_examined: u64,
    /// Rows read into memory from joined sources.
    pub rows_joined: u64,
    /// Groups formed.
    pub groups: u64,
    /// Rows given to the sink.
    pub rows_out: u64,
}

/// How often (in rows examined) the clock is read.
const CLOCK_EVERY: u64 = 1024;

enum Flow {
    Go,
    Stop,
}

struct JoinTable {
    rows: Vec<Value>,
    /// By key hash: (key, row index). Rows whose key is null are left out: null matches
    /// nothing.
    by_key: Option<HashMap<u64, Vec<(Value, usize)>>>,
}

enum AccState {
    Count(i64),
    SumInt(Option<i64>),
    SumFloat(f64),
    Best(Option<Value>),
    Avg(f64, u64),
}

struct Group {
    key: Vec<Value>,
    accs: Vec<AccState>,
}

/// Result rows waiting for ORDER BY, or DISTINCT's memory.
struct Collector {
    rows: Vec<(Vec<Value>, Vec<Value>)>,
    /// LIMIT + OFFSET, when there is a LIMIT: the sort keeps only that many.
    keep: Option<usize>,
    seen: Option<HashTable<(u64, Vec<Value>)>>,
    skipped: u64,
    emitted: u64,
}

struct Run<'q> {
    q: &'q Query,
    stats: RunStats,
    started: Instant,
    scratch: Vec<Value>,
    groups: Vec<Group>,
    group_index: HashTable<(u64, usize)>,
    out: Collector,
}

fn eval_err(e: EvalError) -> QueryError {
    QueryError::Eval(e)
}

fn passes(p: &Option<RowProgram>, row: &[Value]) -> Result<bool, QueryError> {
    match p {
        None => Ok(true),
        Some(p) => p.program.eval_bool(&p.bind(row)).map_err(eval_err),
    }
}

impl Query {
    /// Runs the query: opens its sources through `sources`, gives each result row (its
    /// values in [`Query::columns`] order) to `sink`, which returns `false` to stop
    /// early.
    pub fn run(
        &self,
        sources: &dyn Sources,
        sink: &mut dyn FnMut(Vec<Value>) -> bool,
    ) -> Result<RunStats, QueryError> {
        let keep = match (self.limit, self.order.is_empty()) {
            (Some(l), false) => {
                Some(usize::try_from(l.saturating_add(self.offset)).unwrap_or(usize::MAX))
            }
            _ => None,
        };
        let mut run = Run {
            q: self,
            stats: RunStats::default(),
            started: Instant::now(),
            scratch: Vec::new(),
            groups: Vec::new(),
            group_index: HashTable::new(),
            out: Collector {
                rows: Vec::new(),
                keep,
                seen: self.distinct.then(HashTable::new),
                skipped: 0,
                emitted: 0,
            },
        };
        let joins = run.build_joins(sources)?;
        let n = self.levels.len();
        let mut row = vec![Value::Null; n];
        let first = match &self.levels[0].source {
            LevelSource::Scan(s) => &self.scans[*s],
            _ => unreachable!("the first FROM item is a source"),
        };
        let source_error = |message: String| QueryError::Source {
            source_name: first.name.clone(),
            message,
        };
        let rows = sources.open(first).map_err(source_error)?;
        if self.limit != Some(0) {
            for item in rows {
                row[0] = item.map_err(source_error)?;
                run.stats.rows_scanned += 1;
                run.tick()?;
                if !passes(&self.levels[0].filter, &row)? {
                    continue;
                }
                if let Flow::Stop = run.descend(&joins, 1, &mut row, sink)? {
                    break;
                }
            }
        }
        run.finish(sink)?;
        Ok(run.stats)
    }
}

impl Run<'_> {
    fn tick(&mut self) -> Result<(), QueryError> {
        self.stats.rows_examined += 1;
        let limits = &self.q.limits;
        if self.stats.rows_examined > limits.rows_examined_max {
            return Err(QueryError::Limit {
                limit: QueryLimit::RowsExamined,
                max: limits.rows_examined_max,
            });
        }
        if self.stats.rows_examined.is_multiple_of(CLOCK_EVERY)
            && self.started.elapsed() > limits.time_max
        {
            return Err(QueryError::Limit {
                limit: QueryLimit::Time,
                max: u64::try_from(limits.time_max.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }

    fn build_joins(&mut self, sources: &dyn Sources) -> Result<Vec<Option<JoinTable>>, QueryError> {
        let q = self.q;
        let mut joins = Vec::with_capacity(q.levels.len());
        for (i, level) in q.levels.iter().enumerate() {
            let LevelSource::Join { scan, hash } = &level.source else {
                joins.push(None);
                continue;
            };
            let scan = &q.scans[*scan];
            let source_error = |message: String| QueryError::Source {
                source_name: scan.name.clone(),
                message,
            };
            let mut rows = Vec::new();
            for item in sources.open(scan).map_err(source_error)? {
                rows.push(item.map_err(source_error)?);
                self.stats.rows_joined += 1;
                if self.stats.rows_joined > q.limits.join_rows_max {
                    return Err(QueryError::Limit {
                        limit: QueryLimit::JoinRows,
                        max: q.limits.join_rows_max,
                    });
                }
            }
            let by_key = match hash {
                None => None,
                Some((_, inner)) => {
                    let mut table: HashMap<u64, Vec<(Value, usize)>> = HashMap::new();
                    let mut row = vec![Value::Null; q.levels.len()];
                    for (index, r) in rows.iter().enumerate() {
                        row[i] = r.clone();
                        let key = inner.program.eval(&inner.bind(&row)).map_err(eval_err)?;
                        if matches!(key, Value::Null) {
                            continue;
                        }
                        let h = hash_values(std::slice::from_ref(&key));
                        table.entry(h).or_default().push((key, index));
                    }
                    Some(table)
                }
            };
            joins.push(Some(JoinTable { rows, by_key }));
        }
        Ok(joins)
    }

    /// Binds FROM item `i` to each of its candidates in turn and goes deeper.
    fn descend(
        &mut self,
        joins: &[Option<JoinTable>],
        i: usize,
        row: &mut Vec<Value>,
        sink: &mut dyn FnMut(Vec<Value>) -> bool,
    ) -> Result<Flow, QueryError> {
        let q = self.q;
        let Some(level) = q.levels.get(i) else {
            return self.emit(row, sink);
        };
        let list: Arc<[Value]>;
        let mut bucket: &[(Value, usize)] = &[];
        let mut key = Value::Null;
        let (values, by_index): (&[Value], bool) = match &level.source {
            LevelSource::Scan(_) => unreachable!("only the first FROM item is scanned"),
            LevelSource::Unnest(range) => {
                match range.program.eval(&range.bind(row)).map_err(eval_err)? {
                    Value::List(items) => list = items,
                    Value::Null => list = Arc::from(Vec::new()),
                    other => {
                        return Err(eval_err(
                            EvalError::new(
                                EvalErrorKind::TypeMismatch {
                                    expected: "a list to range over",
                                    found: other.kind_name(),
                                },
                                range.program.span(),
                            )
                            .locate(&q.text),
                        ))
                    }
                }
                (&list[..], false)
            }
            LevelSource::Join { hash, .. } => {
                let table = joins[i].as_ref().expect("join tables are built first");
                match (hash, &table.by_key) {
                    (Some((outer, _)), Some(by_key)) => {
                        key = outer.program.eval(&outer.bind(row)).map_err(eval_err)?;
                        if !matches!(key, Value::Null) {
                            let h = hash_values(std::slice::from_ref(&key));
                            bucket = by_key.get(&h).map_or(&[], Vec::as_slice);
                        }
                        (&table.rows[..], true)
                    }
                    _ => (&table.rows[..], false),
                }
            }
        };
        let count = if by_index { bucket.len() } else { values.len() };
        let mut matched = false;
        for c in 0..count {
            let candidate = if by_index {
                let (k, index) = &bucket[c];
                if *k != key {
                    continue;
                }
                &values[*index]
            } else {
                &values[c]
            };
            self.tick()?;
            row[i] = candidate.clone();
            if level.join == JoinKind::Left {
                if !passes(&level.on, row)? {
                    continue;
                }
                matched = true;
            }
            if passes(&level.filter, row)? {
                if let Flow::Stop = self.descend(joins, i + 1, row, sink)? {
                    return Ok(Flow::Stop);
                }
            }
        }
        if level.join == JoinKind::Left && !matched {
            row[i] = Value::Null;
            if passes(&level.filter, row)? {
                return self.descend(joins, i + 1, row, sink);
            }
        }
        Ok(Flow::Go)
    }

    fn emit(
        &mut self,
        row: &[Value],
        sink: &mut dyn FnMut(Vec<Value>) -> bool,
    ) -> Result<Flow, QueryError> {
        let q = self.q;
        match &q.output {
            Output::Rows(items) => {
                let out: Vec<Value> = if q.star {
                    row.to_vec()
                } else {
                    items
                        .iter()
                        .map(|p| p.program.eval(&p.bind(row)))
                        .collect::<Result<_, _>>()
                        .map_err(eval_err)?
                };
                let keys = q
                    .order
                    .iter()
                    .map(|(k, _)| match k {
                        OrderKey::Column(c) => Ok(out[*c].clone()),
                        OrderKey::Expr(p) => p.program.eval(&p.bind(row)),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(eval_err)?;
                self.collect(keys, out, sink)
            }
            Output::Groups { keys, aggs, .. } => {
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                for k in keys {
                    scratch.push(k.program.eval(&k.bind(row)).map_err(eval_err)?);
                }
                let h = hash_values(&scratch);
                let groups = &self.groups;
                let index = match self
                    .group_index
                    .find(h, |(gh, gi)| *gh == h && groups[*gi].key == scratch)
                {
                    Some((_, gi)) => *gi,
                    None => {
                        if self.groups.len() as u64 >= q.limits.groups_max {
                            return Err(QueryError::Limit {
                                limit: QueryLimit::Groups,
                                max: q.limits.groups_max,
                            });
                        }
                        let gi = self.groups.len();
                        self.groups.push(Group {
                            key: scratch.clone(),
                            accs: aggs.iter().map(new_acc).collect(),
                        });
                        self.group_index.insert_unique(h, (h, gi), |(gh, _)| *gh);
                        self.stats.groups += 1;
                        gi
                    }
                };
                self.scratch = scratch;
                let group = &mut self.groups[index];
                for (acc, agg) in group.accs.iter_mut().zip(aggs) {
                    update(acc, agg, row, &q.text)?;
                }
                Ok(Flow::Go)
            }
        }
    }

    /// Takes one result row: streamed to the sink when there is no ORDER BY, else kept
    /// for sorting.
    fn collect(
        &mut self,
        keys: Vec<Value>,
        out: Vec<Value>,
        sink: &mut dyn FnMut(Vec<Value>) -> bool,
    ) -> Result<Flow, QueryError> {
        let q = self.q;
        if let Some(seen) = &mut self.out.seen {
            let h = hash_values(&out);
            if seen.find(h, |(sh, v)| *sh == h && *v == out).is_some() {
                return Ok(Flow::Go);
            }
            if seen.len() as u64 >= q.limits.result_rows_max {
                return Err(QueryError::Limit {
                    limit: QueryLimit::ResultRows,
                    max: q.limits.result_rows_max,
                });
            }
            seen.insert_unique(h, (h, out.clone()), |(sh, _)| *sh);
        }
        if q.order.is_empty() {
            return Ok(self.deliver(out, sink));
        }
        self.out.rows.push((keys, out));
        match self.out.keep {
            Some(keep) => {
                // Sort and cut whenever twice the rows needed have piled up.
                if self.out.rows.len() >= keep.saturating_mul(2).max(1024) {
                    self.sort();
                    self.out.rows.truncate(keep);
                }
            }
            None => {
                if self.out.rows.len() as u64 > q.limits.result_rows_max {
                    return Err(QueryError::Limit {
                        limit: QueryLimit::ResultRows,
                        max: q.limits.result_rows_max,
                    });
                }
            }
        }
        Ok(Flow::Go)
    }

    /// OFFSET, LIMIT and the result-row limit, then the sink.
    fn deliver(&mut self, out: Vec<Value>, sink: &mut dyn FnMut(Vec<Value>) -> bool) -> Flow {
        let q = self.q;
        if self.out.skipped < q.offset {
            self.out.skipped += 1;
            return Flow::Go;
        }
        if q.limit.is_some_and(|l| self.out.emitted >= l) {
            return Flow::Stop;
        }
        self.out.emitted += 1;
        self.stats.rows_out += 1;
        let go_on = sink(out);
        if !go_on || q.limit.is_some_and(|l| self.out.emitted >= l) {
            Flow::Stop
        } else {
            Flow::Go
        }
    }

    fn sort(&mut self) {
        let order = &self.q.order;
        self.out.rows.sort_by(|(a, _), (b, _)| {
            for ((x, y), (_, desc)) in a.iter().zip(b).zip(order) {
                let o = total_cmp(x, y);
                if o != Ordering::Equal {
                    return if *desc { o.reverse() } else { o };
                }
            }
            Ordering::Equal
        });
    }

    fn finish(&mut self, sink: &mut dyn FnMut(Vec<Value>) -> bool) -> Result<(), QueryError> {
        let q = self.q;
        if let Output::Groups {
            keys,
            aggs,
            items,
            having,
        } = &q.output
        {
            // Aggregates over no rows and no GROUP BY: one row (count 0, others null).
            if keys.is_empty() && self.groups.is_empty() {
                self.groups.push(Group {
                    key: Vec::new(),
                    accs: aggs.iter().map(new_acc).collect(),
                });
            }
            let groups = std::mem::take(&mut self.groups);
            for g in groups {
                let mut post = g.key;
                post.extend(g.accs.into_iter().map(result));
                if !passes(having, &post)? {
                    continue;
                }
                let out: Vec<Value> = items
                    .iter()
                    .map(|p| p.program.eval(&p.bind(&post)))
                    .collect::<Result<_, _>>()
                    .map_err(eval_err)?;
                let sort_keys = q
                    .order
                    .iter()
                    .map(|(k, _)| match k {
                        OrderKey::Column(c) => Ok(out[*c].clone()),
                        OrderKey::Expr(p) => p.program.eval(&p.bind(&post)),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(eval_err)?;
                if let Flow::Stop = self.collect(sort_keys, out, sink)? {
                    return Ok(());
                }
            }
        }
        if !q.order.is_empty() {
            self.sort();
            if let Some(keep) = self.out.keep {
                self.out.rows.truncate(keep);
            }
            let rows = std::mem::take(&mut self.out.rows);
            for (_, out) in rows {
                if let Flow::Stop = self.deliver(out, sink) {
                    break;
                }
            }
        }
        Ok(())
    }
}

fn new_acc(agg: &AggPlan) -> AccState {
    match agg.func {
        AggFunc::CountRows | AggFunc::Count => AccState::Count(0),
        AggFunc::Sum => AccState::SumInt(None),
        AggFunc::Min | AggFunc::Max => AccState::Best(None),
        AggFunc::Avg => AccState::Avg(0.0, 0),
    }
}

fn update(acc: &mut AccState, agg: &AggPlan, row: &[Value], text: &str) -> Result<(), QueryError> {
    let Some(arg) = &agg.arg else {
        if let AccState::Count(n) = acc {
            *n += 1;
        }
        return Ok(());
    };
    let v = arg.program.eval(&arg.bind(row)).map_err(eval_err)?;
    if matches!(v, Value::Null) {
        return Ok(());
    }
    let fail = |kind: EvalErrorKind| eval_err(EvalError::new(kind, agg.span).locate(text));
    let not_number = |v: &Value| {
        fail(EvalErrorKind::TypeMismatch {
            expected: "int or float",
            found: v.kind_name(),
        })
    };
    match acc {
        AccState::Count(n) => *n += 1,
        AccState::SumInt(sum) => match v {
            Value::Int(i) => {
                *sum = Some(
                    sum.unwrap_or(0)
                        .checked_add(i)
                        .ok_or_else(|| fail(EvalErrorKind::Overflow))?,
                );
            }
            Value::Float(f) => *acc = AccState::SumFloat(sum.unwrap_or(0) as f64 + f),
            other => return Err(not_number(&other)),
        },
        AccState::SumFloat(sum) => match v {
            Value::Int(i) => *sum += i as f64,
            Value::Float(f) => *sum += f,
            other => return Err(not_number(&other)),
        },
        AccState::Avg(sum, n) => {
            match v {
                Value::Int(i) => *sum += i as f64,
                Value::Float(f) => *sum += f,
                other => return Err(not_number(&other)),
            }
            *n += 1;
        }
        AccState::Best(best) => {
            let replace = match best {
                None => true,
                Some(b) => match v.compare(b) {
                    Some(o) => {
                        (agg.func == AggFunc::Min && o == Ordering::Less)
                            || (agg.func == AggFunc::Max && o == Ordering::Greater)
                    }
                    None => {
                        return Err(fail(EvalErrorKind::NoOverload {
                            operator: if agg.func == AggFunc::Min {
                                "min"
                            } else {
                                "max"
                            },
                            operands: vec![b.kind_name(), v.kind_name()],
                        }))
                    }
                },
            };
            if replace {
                *best = Some(v);
            }
        }
    }
    Ok(())
}

fn result(acc: AccState) -> Value {
    match acc {
        AccState::Count(n) => Value::Int(n),
        AccState::SumInt(s) => s.map_or(Value::Null, Value::Int),
        AccState::SumFloat(s) => Value::Float(s),
        AccState::Best(b) => b.unwrap_or(Value::Null),
        AccState::Avg(_, 0) => Value::Null,
        AccState::Avg(s, n) => Value::Float(s / n as f64),
    }
}
