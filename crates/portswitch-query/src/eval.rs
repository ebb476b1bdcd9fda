//! The compiled form of a query and its evaluation.
//!
//! A program is a tree of [`Node`]s, evaluated recursively (its height is bounded by
//! [`crate::Limits::depth_max`]). What keeps the common path — field access, comparison,
//! boolean logic — free of allocation and hashing:
//!
//! * Intermediate results are [`Val`]s, which borrow: a field of a bound record is a
//!   `&Value` into the caller's data, a scalar is held inline, and only operations that
//!   build something new (concatenation, `map`, literals with variables in them) own a
//!   [`Value`].
//! * Field paths from a variable (`Tickets[0].Prices["oneway"].Value`) are one [`Path`]
//!   node: a loop over steps whose keys were hashed at compile time.
//! * Comparisons against a constant have nodes of their own ([`Node::EqStr`],
//!   [`Node::CmpInt`]) that test the common case first and fall back to the general
//!   comparison for anything else.
//! * Loop variables live on the Rust stack ([`Scope`]), not in an environment map.
//! * Steps are metered only in loops: the compiler has already checked that one pass
//!   over the nodes outside loops fits the budget (see [`crate::limits`]).

use std::cmp::Ordering;
use std::sync::Arc;

use regex::Regex;

use crate::ast::Macro;
use crate::error::{Cost, EvalError, EvalErrorKind as E, Span};
use crate::limits::{SCAN_BYTES_PER_STEP, VALUE_DEPTH_MAX};
use crate::value::{cmp_int_float, short_str_eq, Key, Map, Value};

/// The built-in functions (everything callable but `matches`, which has its own node
/// because it carries a compiled regex).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Builtin {
    Size,
    Contains,
    StartsWith,
    EndsWith,
    Lower,
    Upper,
    Int,
    Float,
    String,
    Bytes,
    Timestamp,
    Duration,
}

impl Builtin {
    pub(crate) fn from_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "size" => Builtin::Size,
            "contains" => Builtin::Contains,
            "startsWith" => Builtin::StartsWith,
            "endsWith" => Builtin::EndsWith,
            "lower" => Builtin::Lower,
            "upper" => Builtin::Upper,
            "int" => Builtin::Int,
            "float" => Builtin::Float,
            "string" => Builtin::String,
            "bytes" => Builtin::Bytes,
            "timestamp" => Builtin::Timestamp,
            "duration" => Builtin::Duration,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Builtin::Size => "size",
            Builtin::Contains => "contains",
            Builtin::StartsWith => "startsWith",
            Builtin::EndsWith => "endsWith",
            Builtin::Lower => "lower",
            Builtin::Upper => "upper",
            Builtin::Int => "int",
            Builtin::Float => "float",
            Builtin::String => "string",
            Builtin::Bytes => "bytes",
            Builtin::Timestamp => "timestamp",
            Builtin::Duration => "duration",
        }
    }

    /// Arguments, counting the receiver of a method call.
    pub(crate) fn arity(self) -> usize {
        match self {
            Builtin::Contains | Builtin::StartsWith | Builtin::EndsWith => 2,
            _ => 1,
        }
    }
}

/// Arithmetic operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl ArithOp {
    fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Rem => "%",
        }
    }
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// The operator with its operands swapped (`1 < x` is `x > 1`).
    pub(crate) fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            same => same,
        }
    }

    /// Applies an ordering operator; `None` (NaN involved) makes every ordering false.
    #[inline]
    fn test(self, ord: Option<Ordering>) -> bool {
        match (self, ord) {
            (CmpOp::Eq, o) => o == Some(Ordering::Equal),
            (CmpOp::Ne, o) => o != Some(Ordering::Equal),
            (_, None) => false,
            (CmpOp::Lt, Some(o)) => o.is_lt(),
            (CmpOp::Le, Some(o)) => o.is_le(),
            (CmpOp::Gt, Some(o)) => o.is_gt(),
            (CmpOp::Ge, Some(o)) => o.is_ge(),
        }
    }
}

/// A compiled expression.
#[derive(Debug)]
pub(crate) enum Node {
    Const(Value),
    Path(Box<Path>),
    /// Field of something that is not a path (a call result, a literal with variables).
    Field(Box<FieldNode>),
    Has(Box<FieldNode>),
    Index(Box<BinaryNode>),
    Not(Box<UnaryNode>),
    Neg(Box<UnaryNode>),
    And(Box<[Operand]>),
    Or(Box<[Operand]>),
    Arith(Box<ArithNode>),
    Cmp(Box<CmpNode>),
    /// `x == "literal"` / `x != "literal"`.
    EqStr(Box<EqStrNode>),
    /// `x <op> integer literal`.
    CmpInt(Box<CmpIntNode>),
    In(Box<BinaryNode>),
    Ternary(Box<TernaryNode>),
    List(Box<ListNode>),
    Map(Box<MapNode>),
    Call1(Box<Call1Node>),
    Call2(Box<Call2Node>),
    Matches(Box<MatchesNode>),
    Loop(Box<LoopNode>),
}

/// Where a path starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Root {
    /// A bound variable, by slot.
    Var(u32),
    /// A loop variable, by its scope index.
    Local(u32),
}

#[derive(Debug)]
pub(crate) enum StepKind {
    Field(Key),
    Index(i64),
}

#[derive(Debug)]
pub(crate) struct Step {
    pub kind: StepKind,
    pub span: Span,
}

/// `root.step.step…`: a variable followed by constant field names and list indices.
#[derive(Debug)]
pub(crate) struct Path {
    pub root: Root,
    /// The variable's own span, for "not bound".
    pub root_span: Span,
    pub steps: Vec<Step>,
    /// The whole path's span.
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct FieldNode {
    pub target: Node,
    pub key: Key,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct BinaryNode {
    pub lhs: Node,
    pub rhs: Node,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct UnaryNode {
    pub operand: Node,
    pub span: Span,
}

/// An operand of `&&`/`||`, with its span for the error if it is not a bool.
#[derive(Debug)]
pub(crate) struct Operand {
    pub node: Node,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct ArithNode {
    pub op: ArithOp,
    pub lhs: Node,
    pub rhs: Node,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct CmpNode {
    pub op: CmpOp,
    pub lhs: Node,
    pub rhs: Node,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct EqStrNode {
    pub lhs: Node,
    /// The literal, as a value for the general comparison when `lhs` is not a string.
    pub literal: Value,
    pub negate: bool,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct CmpIntNode {
    pub op: CmpOp,
    pub lhs: Node,
    pub literal: i64,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct TernaryNode {
    pub cond: Operand,
    pub then: Node,
    pub otherwise: Node,
}

#[derive(Debug)]
pub(crate) struct ListNode {
    pub items: Vec<Node>,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct MapNode {
    pub entries: Vec<(Node, Node)>,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct Call1Node {
    pub func: Builtin,
    pub arg: Node,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct Call2Node {
    pub func: Builtin,
    pub a: Node,
    pub b: Node,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct MatchesNode {
    pub target: Node,
    /// Compiled once, when the program was compiled.
    pub regex: Regex,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct LoopNode {
    pub kind: Macro,
    pub range: Node,
    pub local: u32,
    pub body: Node,
    /// For "the predicate is not a bool".
    pub body_span: Span,
    /// Steps charged per iteration: the body's node count plus one. Loops inside the body
    /// charge their own iterations.
    pub iteration_cost: u64,
    pub span: Span,
}

/// An intermediate result: borrowed where possible.
#[derive(Clone, Debug)]
pub(crate) enum Val<'a> {
    Ref(&'a Value),
    Bool(bool),
    Int(i64),
    Float(f64),
    Time(i64),
    Duration(i64),
    Owned(Value),
}

/// A value seen through whatever holds it: what every operation matches on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum View<'x> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'x str),
    Bytes(&'x [u8]),
    Time(i64),
    Duration(i64),
    List(&'x [Value]),
    Map(&'x Map),
}

#[inline]
fn view_of(v: &Value) -> View<'_> {
    match v {
        Value::Null => View::Null,
        Value::Bool(b) => View::Bool(*b),
        Value::Int(i) => View::Int(*i),
        Value::Float(f) => View::Float(*f),
        Value::String(s) => View::Str(s),
        Value::Bytes(b) => View::Bytes(b),
        Value::Time(t) => View::Time(*t),
        Value::Duration(d) => View::Duration(*d),
        Value::List(l) => View::List(l),
        Value::Map(m) => View::Map(m),
    }
}

impl View<'_> {
    fn kind_name(&self) -> &'static str {
        match self {
            View::Null => "null",
            View::Bool(_) => "bool",
            View::Int(_) => "int",
            View::Float(_) => "float",
            View::Str(_) => "string",
            View::Bytes(_) => "bytes",
            View::Time(_) => "timestamp",
            View::Duration(_) => "duration",
            View::List(_) => "list",
            View::Map(_) => "map",
        }
    }
}

impl<'a> Val<'a> {
    #[inline]
    pub(crate) fn view(&self) -> View<'_> {
        match self {
            Val::Ref(v) => view_of(v),
            Val::Bool(b) => View::Bool(*b),
            Val::Int(i) => View::Int(*i),
            Val::Float(f) => View::Float(*f),
            Val::Time(t) => View::Time(*t),
            Val::Duration(d) => View::Duration(*d),
            Val::Owned(v) => view_of(v),
        }
    }

    pub(crate) fn into_value(self) -> Value {
        match self {
            Val::Ref(v) => v.clone(),
            Val::Bool(b) => Value::Bool(b),
            Val::Int(i) => Value::Int(i),
            Val::Float(f) => Value::Float(f),
            Val::Time(t) => Value::Time(t),
            Val::Duration(d) => Value::Duration(d),
            Val::Owned(v) => v,
        }
    }

    /// Applies `f` to the value inside, keeping the borrow if there is one.
    fn project(
        self,
        f: impl FnOnce(&Value) -> Result<&Value, EvalError>,
    ) -> Result<Val<'a>, EvalError> {
        match self {
            Val::Ref(v) => f(v).map(Val::Ref),
            Val::Owned(v) => f(&v).map(|inner| Val::Owned(inner.clone())),
            // Scalars have no fields or elements; `f` reports the mismatch.
            other => f(&other.into_value()).map(|inner| Val::Owned(inner.clone())),
        }
    }
}

/// The bindings of one evaluation, by slot.
#[derive(Clone, Copy)]
pub(crate) struct Env<'a> {
    pub slots: &'a [Option<&'a Value>],
    pub names: &'a [Key],
}

impl<'a> Env<'a> {
    #[inline]
    fn var(&self, slot: u32, span: Span) -> Result<&'a Value, EvalError> {
        match self.slots.get(slot as usize) {
            Some(Some(v)) => Ok(v),
            _ => Err(self.unbound(slot, span)),
        }
    }

    #[cold]
    fn unbound(&self, slot: u32, span: Span) -> EvalError {
        let name = self
            .names
            .get(slot as usize)
            .map_or("?", |k| k.name())
            .to_owned();
        EvalError::new(E::Unbound(name), span)
    }
}

/// A loop variable, linked to the enclosing loops' variables on the Rust stack.
pub(crate) struct Scope<'s, 'a> {
    index: u32,
    val: Val<'a>,
    parent: Option<&'s Scope<'s, 'a>>,
}

fn local<'s, 'a>(mut scope: Option<&'s Scope<'s, 'a>>, index: u32) -> Option<&'s Val<'a>> {
    while let Some(s) = scope {
        if s.index == index {
            return Some(&s.val);
        }
        scope = s.parent;
    }
    None
}

/// What is left of the budgets of one evaluation.
pub(crate) struct Meter {
    steps: u64,
    memory: u64,
}

impl Meter {
    pub(crate) fn new(steps: u64, memory: u64) -> Meter {
        Meter { steps, memory }
    }

    #[inline]
    fn charge(&mut self, steps: u64, span: Span) -> Result<(), EvalError> {
        match self.steps.checked_sub(steps) {
            Some(left) => {
                self.steps = left;
                Ok(())
            }
            None => Err(EvalError::new(E::CostExceeded(Cost::Steps), span)),
        }
    }

    /// Charges a scan over `n` bytes or elements.
    #[inline]
    fn scan(&mut self, n: usize, span: Span) -> Result<(), EvalError> {
        let steps = n as u64 / SCAN_BYTES_PER_STEP;
        if steps == 0 {
            return Ok(());
        }
        self.charge(steps, span)
    }

    /// Charges an allocation of `bytes`, before it is made.
    fn alloc(&mut self, bytes: usize, span: Span) -> Result<(), EvalError> {
        match self.memory.checked_sub(bytes as u64) {
            Some(left) => {
                self.memory = left;
                Ok(())
            }
            None => Err(EvalError::new(E::CostExceeded(Cost::Memory), span)),
        }
    }
}

#[cold]
fn mismatch(expected: &'static str, found: &View<'_>, span: Span) -> EvalError {
    EvalError::new(
        E::TypeMismatch {
            expected,
            found: found.kind_name(),
        },
        span,
    )
}

#[cold]
fn no_overload(operator: &'static str, operands: &[&View<'_>], span: Span) -> EvalError {
    EvalError::new(
        E::NoOverload {
            operator,
            operands: operands.iter().map(|v| v.kind_name()).collect(),
        },
        span,
    )
}

#[cold]
fn overflow(span: Span) -> EvalError {
    EvalError::new(E::Overflow, span)
}

fn index_list(items: &[Value], index: i64, span: Span) -> Result<&Value, EvalError> {
    usize::try_from(index)
        .ok()
        .and_then(|i| items.get(i))
        .ok_or_else(|| {
            EvalError::new(
                E::IndexOutOfRange {
                    index,
                    len: items.len(),
                },
                span,
            )
        })
}

fn field<'v>(v: &'v Value, key: &Key, span: Span) -> Result<&'v Value, EvalError> {
    match v {
        Value::Map(m) => m
            .get_key(key)
            .ok_or_else(|| EvalError::new(E::NoSuchKey(key.name().to_owned()), span)),
        other => Err(mismatch("map", &view_of(other), span)),
    }
}

impl Step {
    #[inline(always)]
    fn apply<'v>(&self, v: &'v Value) -> Result<&'v Value, EvalError> {
        match (&self.kind, v) {
            (StepKind::Field(key), Value::Map(m)) => match m.get_key(key) {
                Some(found) => Ok(found),
                None => Err(EvalError::new(
                    E::NoSuchKey(key.name().to_owned()),
                    self.span,
                )),
            },
            (StepKind::Index(i), Value::List(items)) => index_list(items, *i, self.span),
            (StepKind::Field(_), other) => Err(mismatch("map", &view_of(other), self.span)),
            (StepKind::Index(_), other) => Err(mismatch("list", &view_of(other), self.span)),
        }
    }
}

impl Path {
    #[inline(always)]
    fn eval<'a>(
        &'a self,
        env: &Env<'a>,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Val<'a>, EvalError> {
        let mut cur: &'a Value = match self.root {
            Root::Var(slot) => env.var(slot, self.root_span)?,
            Root::Local(index) => match local(scope, index) {
                Some(Val::Ref(v)) => v,
                Some(other) if self.steps.is_empty() => return Ok(other.clone()),
                Some(other) => return Err(mismatch("map or list", &other.view(), self.span)),
                None => {
                    return Err(EvalError::new(
                        E::Unbound("loop variable".into()),
                        self.span,
                    ))
                }
            },
        };
        for step in &self.steps {
            cur = step.apply(cur)?;
        }
        Ok(Val::Ref(cur))
    }
}

impl EqStrNode {
    #[inline]
    fn test<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<bool, EvalError> {
        let lhs = self.lhs.eval_operand(env, meter, scope)?;
        let equal = match (&lhs, &self.literal) {
            (Val::Ref(Value::String(s)), Value::String(lit)) => short_str_eq(s, lit),
            _ => eq_views(lhs.view(), view_of(&self.literal), meter, 0, self.span)?,
        };
        Ok(equal != self.negate)
    }
}

impl CmpIntNode {
    #[inline]
    fn test<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<bool, EvalError> {
        match self.lhs.eval_operand(env, meter, scope)? {
            Val::Ref(&Value::Int(i)) | Val::Int(i) => Ok(self.op.test(Some(i.cmp(&self.literal)))),
            other => compare(
                self.op,
                other.view(),
                View::Int(self.literal),
                meter,
                self.span,
            ),
        }
    }
}

impl Node {
    /// Evaluates an operand, taking the common case of a path without a call through the
    /// general dispatch.
    #[inline(always)]
    fn eval_operand<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Val<'a>, EvalError> {
        match self {
            Node::Path(p) => p.eval(env, scope),
            Node::Arith(n) => n.eval(env, meter, scope),
            other => other.eval(env, meter, scope),
        }
    }

    /// Evaluates to a bool, or a type mismatch at `span`. Boolean nodes are evaluated
    /// here directly, without making a [`Val`].
    pub(crate) fn eval_bool<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
        span: Span,
    ) -> Result<bool, EvalError> {
        match self {
            Node::And(operands) => {
                for o in operands.iter() {
                    if !o.node.eval_bool(env, meter, scope, o.span)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Node::Or(operands) => {
                for o in operands.iter() {
                    if o.node.eval_bool(env, meter, scope, o.span)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Node::Not(n) => Ok(!n.operand.eval_bool(env, meter, scope, n.span)?),
            Node::EqStr(n) => n.test(env, meter, scope),
            Node::CmpInt(n) => n.test(env, meter, scope),
            other => match other.eval_operand(env, meter, scope)? {
                Val::Bool(b) | Val::Ref(&Value::Bool(b)) => Ok(b),
                v => Err(mismatch("bool", &v.view(), span)),
            },
        }
    }

    /// Evaluates the node. The common nodes are handled here; the others have a function
    /// each, so that the frame of this recursive function stays small in unoptimised
    /// builds (where `DEPTH_MAX` must hold too); optimised builds inline the small ones.
    pub(crate) fn eval<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Val<'a>, EvalError> {
        match self {
            Node::Const(v) => Ok(Val::Ref(v)),
            Node::Path(p) => p.eval(env, scope),
            Node::Not(_) | Node::And(_) | Node::Or(_) | Node::EqStr(_) | Node::CmpInt(_) => {
                // These always produce a bool, so the span for a non-bool is never used.
                self.eval_bool(env, meter, scope, Span::default())
                    .map(Val::Bool)
            }
            Node::Field(n) => n.field(env, meter, scope),
            Node::Has(n) => n.has(env, meter, scope),
            Node::Index(n) => n.index(env, meter, scope),
            Node::Neg(n) => n.neg(env, meter, scope),
            Node::Arith(n) => n.eval(env, meter, scope),
            Node::Cmp(n) => n.eval(env, meter, scope),
            Node::In(n) => n.contains(env, meter, scope),
            Node::Ternary(n) => n.eval(env, meter, scope),
            Node::List(n) => n.eval(env, meter, scope),
            Node::Map(n) => n.eval(env, meter, scope),
            Node::Call1(n) => n.eval(env, meter, scope),
            Node::Call2(n) => n.eval(env, meter, scope),
            Node::Matches(n) => n.eval(env, meter, scope),
            Node::Loop(n) => n.eval(env, meter, scope),
        }
    }
}

/// The signature every node's evaluation shares.
macro_rules! eval_fn {
    ($(#[$attr:meta])* fn $name:ident($self:ident, $env:ident, $meter:ident, $scope:ident) $body:block) => {
        $(#[$attr])*
        fn $name<'a>(
            &'a $self,
            $env: &Env<'a>,
            $meter: &mut Meter,
            $scope: Option<&Scope<'_, 'a>>,
        ) -> Result<Val<'a>, EvalError> $body
    };
}

impl FieldNode {
    eval_fn! {
        #[inline]
        fn field(self, env, meter, scope) {
            let target = self.target.eval(env, meter, scope)?;
            target.project(|v| field(v, &self.key, self.span))
        }
    }

    eval_fn! {
        #[inline]
        fn has(self, env, meter, scope) {
            match self.target.eval(env, meter, scope)?.view() {
                View::Map(m) => Ok(Val::Bool(m.get_key(&self.key).is_some())),
                other => Err(mismatch("map", &other, self.span)),
            }
        }
    }
}

impl BinaryNode {
    eval_fn! {
        #[inline]
        fn index(self, env, meter, scope) {
            let target = self.lhs.eval(env, meter, scope)?;
            let index = self.rhs.eval(env, meter, scope)?;
            let span = self.span;
            target.project(|v| match (view_of(v), index.view()) {
                (View::List(items), View::Int(i)) => index_list(items, i, span),
                (View::Map(m), View::Str(k)) => m
                    .get(k)
                    .ok_or_else(|| EvalError::new(E::NoSuchKey(k.to_owned()), span)),
                (t, i) => Err(no_overload("[]", &[&t, &i], span)),
            })
        }
    }

    eval_fn! {
        #[inline]
        fn contains(self, env, meter, scope) {
            let needle = self.lhs.eval(env, meter, scope)?;
            let haystack = self.rhs.eval(env, meter, scope)?;
            contains(needle.view(), haystack.view(), meter, self.span).map(Val::Bool)
        }
    }
}

impl UnaryNode {
    eval_fn! {
        #[inline]
        fn neg(self, env, meter, scope) {
            let v = self.operand.eval(env, meter, scope)?;
            match v.view() {
                View::Int(i) => i.checked_neg().map(Val::Int).ok_or_else(|| overflow(self.span)),
                View::Float(f) => Ok(Val::Float(-f)),
                View::Duration(d) => d
                    .checked_neg()
                    .map(Val::Duration)
                    .ok_or_else(|| overflow(self.span)),
                other => Err(no_overload("-", &[&other], self.span)),
            }
        }
    }
}

/// A number, or not one: what the arithmetic fast path passes around. Sixteen bytes,
/// so that `Result<Num, EvalError>` comes back in registers (a wider result, stored as
/// a vector and its tag read back as an integer, stalled the store buffer for longer
/// than the arithmetic took).
#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
    /// Not a number, or not cheap to find out: take the general path.
    No,
}

impl Node {
    /// The fast path of arithmetic: constants, paths and arithmetic over them, as
    /// numbers. Anything else is `No` without being evaluated, so nothing is ever
    /// evaluated twice except a path (cheap, and unmetered either way).
    #[inline(always)]
    fn num<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Num, EvalError> {
        Ok(match self {
            Node::Const(Value::Int(i)) => Num::Int(*i),
            Node::Const(Value::Float(f)) => Num::Float(*f),
            Node::Path(p) => match p.eval(env, scope)? {
                Val::Ref(&Value::Int(i)) | Val::Int(i) => Num::Int(i),
                Val::Ref(&Value::Float(f)) | Val::Float(f) => Num::Float(f),
                _ => Num::No,
            },
            Node::Arith(n) => n.num(env, meter, scope)?,
            _ => Num::No,
        })
    }

    /// An operand of arithmetic on the general path (no fast-path probe again).
    #[inline]
    fn eval_arith_operand<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Val<'a>, EvalError> {
        match self {
            Node::Path(p) => p.eval(env, scope),
            Node::Arith(n) => n.eval_general(env, meter, scope),
            other => other.eval(env, meter, scope),
        }
    }
}

impl ArithNode {
    eval_fn! {
        #[inline]
        fn eval(self, env, meter, scope) {
            match self.num(env, meter, scope)? {
                Num::Int(i) => Ok(Val::Int(i)),
                Num::Float(f) => Ok(Val::Float(f)),
                Num::No => self.eval_general(env, meter, scope),
            }
        }
    }

    eval_fn! {
        fn eval_general(self, env, meter, scope) {
            let lhs = self.lhs.eval_arith_operand(env, meter, scope)?;
            let rhs = self.rhs.eval_arith_operand(env, meter, scope)?;
            arith(self.op, lhs.view(), rhs.view(), meter, self.span)
        }
    }

    fn num<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Num, EvalError> {
        use ArithOp::*;
        let lhs = self.lhs.num(env, meter, scope)?;
        if let Num::No = lhs {
            return Ok(Num::No);
        }
        let rhs = self.rhs.num(env, meter, scope)?;
        let float = |x: f64, y: f64| match self.op {
            Add => Num::Float(x + y),
            Sub => Num::Float(x - y),
            Mul => Num::Float(x * y),
            Div => Num::Float(x / y),
            Rem => Num::No,
        };
        let overflow_at = |r: Option<i64>| r.map(Num::Int).ok_or_else(|| overflow(self.span));
        Ok(match (lhs, rhs) {
            (Num::Int(x), Num::Int(y)) => match self.op {
                Add => overflow_at(x.checked_add(y))?,
                Sub => overflow_at(x.checked_sub(y))?,
                Mul => overflow_at(x.checked_mul(y))?,
                // Division and remainder check for zero on the general path.
                Div | Rem => Num::No,
            },
            (Num::Float(x), Num::Float(y)) => float(x, y),
            (Num::Int(x), Num::Float(y)) => float(x as f64, y),
            (Num::Float(x), Num::Int(y)) => float(x, y as f64),
            _ => Num::No,
        })
    }
}

impl CmpNode {
    eval_fn! {
        #[inline]
        fn eval(self, env, meter, scope) {
            let lhs = self.lhs.eval_operand(env, meter, scope)?;
            let rhs = self.rhs.eval_operand(env, meter, scope)?;
            compare(self.op, lhs.view(), rhs.view(), meter, self.span).map(Val::Bool)
        }
    }
}

impl TernaryNode {
    eval_fn! {
        #[inline]
        fn eval(self, env, meter, scope) {
            if self.cond.node.eval_bool(env, meter, scope, self.cond.span)? {
                self.then.eval(env, meter, scope)
            } else {
                self.otherwise.eval(env, meter, scope)
            }
        }
    }
}

impl ListNode {
    eval_fn! {
        #[inline(never)]
        fn eval(self, env, meter, scope) {
            meter.alloc(self.items.len() * std::mem::size_of::<Value>(), self.span)?;
            let mut items = Vec::with_capacity(self.items.len());
            for item in &self.items {
                items.push(item.eval(env, meter, scope)?.into_value());
            }
            Ok(Val::Owned(Value::List(items.into())))
        }
    }
}

impl MapNode {
    eval_fn! {
        #[inline(never)]
        fn eval(self, env, meter, scope) {
            meter.alloc(self.entries.len() * MAP_ENTRY_BYTES, self.span)?;
            let mut map = Map::with_capacity(self.entries.len());
            for (k, v) in &self.entries {
                let key: Arc<str> = match k.eval(env, meter, scope)? {
                    Val::Ref(Value::String(s)) => s.clone(),
                    Val::Owned(Value::String(s)) => s,
                    other => return Err(mismatch("string", &other.view(), self.span)),
                };
                meter.alloc(key.len(), self.span)?;
                let value = v.eval(env, meter, scope)?.into_value();
                if map.contains_key(&key) {
                    return Err(EvalError::new(E::DuplicateKey(key.to_string()), self.span));
                }
                map.insert(key, value);
            }
            Ok(Val::Owned(Value::Map(Arc::new(map))))
        }
    }
}

impl Call1Node {
    eval_fn! {
        #[inline(never)]
        fn eval(self, env, meter, scope) {
            let arg = self.arg.eval(env, meter, scope)?;
            call1(self.func, arg, meter, self.span)
        }
    }
}

impl Call2Node {
    eval_fn! {
        #[inline(never)]
        fn eval(self, env, meter, scope) {
            let a = self.a.eval(env, meter, scope)?;
            let b = self.b.eval(env, meter, scope)?;
            call2(self.func, a.view(), b.view(), meter, self.span)
        }
    }
}

impl MatchesNode {
    eval_fn! {
        #[inline(never)]
        fn eval(self, env, meter, scope) {
            let target = self.target.eval(env, meter, scope)?;
            match target.view() {
                View::Str(s) => {
                    // The regex engines are linear in the input, with a larger constant
                    // than a plain scan.
                    meter.scan(s.len().saturating_mul(4), self.span)?;
                    Ok(Val::Bool(self.regex.is_match(s)))
                }
                other => Err(no_overload("matches", &[&other, &View::Str("")], self.span)),
            }
        }
    }
}

/// Bytes charged per map entry built, beyond its key: the entry, its hash, and an index
/// slot.
const MAP_ENTRY_BYTES: usize = std::mem::size_of::<(Arc<str>, Value)>() + 16;

/// The elements a loop runs over: list items, or map keys.
enum Elems<'r> {
    List(std::slice::Iter<'r, Value>),
    Keys(std::slice::Iter<'r, (Arc<str>, Value)>),
}

impl<'r> Iterator for Elems<'r> {
    type Item = Val<'r>;

    fn next(&mut self) -> Option<Val<'r>> {
        match self {
            Elems::List(it) => it.next().map(Val::Ref),
            // A key is shared, not copied: `filter` over a map's keys returns them.
            Elems::Keys(it) => it.next().map(|(k, _)| Val::Owned(Value::String(k.clone()))),
        }
    }
}

impl LoopNode {
    #[inline(never)]
    fn eval<'a>(
        &'a self,
        env: &Env<'a>,
        meter: &mut Meter,
        scope: Option<&Scope<'_, 'a>>,
    ) -> Result<Val<'a>, EvalError> {
        let range = self.range.eval(env, meter, scope)?;
        // The elements borrow from `range`, which may be a list built just now and owned
        // by this frame; the body runs on that shorter borrow, and whatever survives the
        // loop (a `map` or `filter` result) is turned into owned values first.
        let (elems, len) = match range.view() {
            View::List(items) => (Elems::List(items.iter()), items.len()),
            View::Map(m) => (Elems::Keys(m.entries().iter()), m.len()),
            other => return Err(mismatch("list or map", &other, self.span)),
        };
        let collects = matches!(self.kind, Macro::Map | Macro::Filter);
        let mut out = Vec::new();
        if collects {
            meter.alloc(len.saturating_mul(std::mem::size_of::<Value>()), self.span)?;
            out.reserve_exact(len);
        }
        for elem in elems {
            meter.charge(self.iteration_cost, self.span)?;
            let inner = Scope {
                index: self.local,
                val: elem,
                parent: scope,
            };
            let body_span = self.body_span;
            match self.kind {
                Macro::All => {
                    if !self.body.eval_bool(env, meter, Some(&inner), body_span)? {
                        return Ok(Val::Bool(false));
                    }
                }
                Macro::Exists => {
                    if self.body.eval_bool(env, meter, Some(&inner), body_span)? {
                        return Ok(Val::Bool(true));
                    }
                }
                Macro::Map => out.push(self.body.eval(env, meter, Some(&inner))?.into_value()),
                Macro::Filter => {
                    if self.body.eval_bool(env, meter, Some(&inner), body_span)? {
                        out.push(inner.val.into_value());
                    }
                }
            }
        }
        Ok(match self.kind {
            Macro::All => Val::Bool(true),
            Macro::Exists => Val::Bool(false),
            Macro::Map | Macro::Filter => Val::Owned(Value::List(out.into())),
        })
    }
}

/// `==` on views: numbers compare across int and float, other kinds only with their own
/// kind, lists and maps by content (to [`VALUE_DEPTH_MAX`]).
pub(crate) fn eq_views(
    a: View<'_>,
    b: View<'_>,
    meter: &mut Meter,
    depth: usize,
    span: Span,
) -> Result<bool, EvalError> {
    Ok(match (a, b) {
        (View::Null, View::Null) => true,
        (View::Bool(x), View::Bool(y)) => x == y,
        (View::Int(x), View::Int(y)) => x == y,
        (View::Float(x), View::Float(y)) => x == y,
        (View::Int(i), View::Float(f)) | (View::Float(f), View::Int(i)) => {
            cmp_int_float(i, f) == Some(Ordering::Equal)
        }
        (View::Str(x), View::Str(y)) => {
            meter.scan(x.len().min(y.len()), span)?;
            x == y
        }
        (View::Bytes(x), View::Bytes(y)) => {
            meter.scan(x.len().min(y.len()), span)?;
            x == y
        }
        (View::Time(x), View::Time(y)) | (View::Duration(x), View::Duration(y)) => x == y,
        (View::List(x), View::List(y)) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            if depth >= VALUE_DEPTH_MAX {
                return Err(EvalError::new(E::CostExceeded(Cost::ValueDepth), span));
            }
            meter.scan(x.len(), span)?;
            for (p, q) in x.iter().zip(y.iter()) {
                if !eq_views(view_of(p), view_of(q), meter, depth + 1, span)? {
                    return Ok(false);
                }
            }
            true
        }
        (View::Map(x), View::Map(y)) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            if depth >= VALUE_DEPTH_MAX {
                return Err(EvalError::new(E::CostExceeded(Cost::ValueDepth), span));
            }
            meter.scan(x.len(), span)?;
            for (k, v) in x.iter() {
                let Some(w) = y.get(k) else {
                    return Ok(false);
                };
                if !eq_views(view_of(v), view_of(w), meter, depth + 1, span)? {
                    return Ok(false);
                }
            }
            true
        }
        _ => false,
    })
}

fn compare(
    op: CmpOp,
    a: View<'_>,
    b: View<'_>,
    meter: &mut Meter,
    span: Span,
) -> Result<bool, EvalError> {
    let ord = match (a, b) {
        _ if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
            let equal = eq_views(a, b, meter, 0, span)?;
            return Ok(equal == (op == CmpOp::Eq));
        }
        (View::Int(x), View::Int(y)) => Some(x.cmp(&y)),
        (View::Float(x), View::Float(y)) => x.partial_cmp(&y),
        (View::Int(i), View::Float(f)) => cmp_int_float(i, f),
        (View::Float(f), View::Int(i)) => cmp_int_float(i, f).map(Ordering::reverse),
        (View::Str(x), View::Str(y)) => {
            meter.scan(x.len().min(y.len()), span)?;
            Some(x.cmp(y))
        }
        (View::Bytes(x), View::Bytes(y)) => {
            meter.scan(x.len().min(y.len()), span)?;
            Some(x.cmp(y))
        }
        (View::Bool(x), View::Bool(y)) => Some(x.cmp(&y)),
        (View::Time(x), View::Time(y)) | (View::Duration(x), View::Duration(y)) => Some(x.cmp(&y)),
        _ => return Err(no_overload(op.symbol(), &[&a, &b], span)),
    };
    Ok(op.test(ord))
}

fn contains(
    needle: View<'_>,
    haystack: View<'_>,
    meter: &mut Meter,
    span: Span,
) -> Result<bool, EvalError> {
    match haystack {
        View::List(items) => {
            meter.scan(items.len(), span)?;
            for item in items {
                if eq_views(needle, view_of(item), meter, 0, span)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        View::Map(m) => match needle {
            View::Str(k) => Ok(m.contains_key(k)),
            other => Err(no_overload("in", &[&other, &haystack], span)),
        },
        other => Err(no_overload("in", &[&needle, &other], span)),
    }
}

fn arith<'a>(
    op: ArithOp,
    a: View<'_>,
    b: View<'_>,
    meter: &mut Meter,
    span: Span,
) -> Result<Val<'a>, EvalError> {
    use ArithOp::*;
    let checked = |r: Option<i64>| r.ok_or_else(|| overflow(span));
    Ok(match (op, a, b) {
        (_, View::Int(x), View::Int(y)) => Val::Int(match op {
            Add => checked(x.checked_add(y))?,
            Sub => checked(x.checked_sub(y))?,
            Mul => checked(x.checked_mul(y))?,
            Div | Rem if y == 0 => return Err(EvalError::new(E::DivisionByZero, span)),
            Div => checked(x.checked_div(y))?,
            Rem => checked(x.checked_rem(y))?,
        }),
        (Add | Sub | Mul | Div, View::Int(_) | View::Float(_), View::Int(_) | View::Float(_)) => {
            let (x, y) = (as_f64(a), as_f64(b));
            Val::Float(match op {
                Add => x + y,
                Sub => x - y,
                Mul => x * y,
                _ => x / y,
            })
        }
        (Add, View::Str(x), View::Str(y)) => {
            let len = x.len().saturating_add(y.len());
            meter.alloc(len, span)?;
            meter.scan(len, span)?;
            let mut s = String::with_capacity(len);
            s.push_str(x);
            s.push_str(y);
            Val::Owned(Value::String(s.into()))
        }
        (Add, View::Bytes(x), View::Bytes(y)) => {
            let len = x.len().saturating_add(y.len());
            meter.alloc(len, span)?;
            meter.scan(len, span)?;
            Val::Owned(Value::Bytes(x.iter().chain(y).copied().collect()))
        }
        (Add, View::List(x), View::List(y)) => {
            let len = x.len().saturating_add(y.len());
            meter.alloc(len.saturating_mul(std::mem::size_of::<Value>()), span)?;
            meter.scan(len, span)?;
            Val::Owned(Value::List(x.iter().chain(y).cloned().collect()))
        }
        (Add, View::Time(t), View::Duration(d)) | (Add, View::Duration(d), View::Time(t)) => {
            Val::Time(checked(t.checked_add(d))?)
        }
        (Sub, View::Time(t), View::Duration(d)) => Val::Time(checked(t.checked_sub(d))?),
        (Sub, View::Time(t), View::Time(u)) => Val::Duration(checked(t.checked_sub(u))?),
        (Add, View::Duration(x), View::Duration(y)) => Val::Duration(checked(x.checked_add(y))?),
        (Sub, View::Duration(x), View::Duration(y)) => Val::Duration(checked(x.checked_sub(y))?),
        _ => return Err(no_overload(op.symbol(), &[&a, &b], span)),
    })
}

fn as_f64(v: View<'_>) -> f64 {
    match v {
        View::Int(i) => i as f64,
        View::Float(f) => f,
        _ => f64::NAN,
    }
}

fn invalid(message: String, span: Span) -> EvalError {
    EvalError::new(E::InvalidArgument(message), span)
}

/// Converts a float to an int by truncation, refusing what does not fit.
pub(crate) fn float_to_int(f: f64) -> Option<i64> {
    // -2^63 is representable and fits; 2^63 is the first float that does not.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    (f.is_finite() && (-TWO_63..TWO_63).contains(&f)).then_some(f as i64)
}

fn owned_string(s: String, meter: &mut Meter, span: Span) -> Result<Val<'static>, EvalError> {
    meter.alloc(s.len(), span)?;
    Ok(Val::Owned(Value::String(s.into())))
}

fn call1<'a>(
    func: Builtin,
    arg: Val<'a>,
    meter: &mut Meter,
    span: Span,
) -> Result<Val<'a>, EvalError> {
    let view = arg.view();
    let fail = || no_overload(func.name(), &[&view], span);
    Ok(match func {
        Builtin::Size => {
            let n = match view {
                View::Str(s) => {
                    meter.scan(s.len(), span)?;
                    s.chars().count()
                }
                View::Bytes(b) => b.len(),
                View::List(l) => l.len(),
                View::Map(m) => m.len(),
                _ => return Err(fail()),
            };
            Val::Int(i64::try_from(n).unwrap_or(i64::MAX))
        }
        Builtin::Lower | Builtin::Upper => {
            let View::Str(s) = view else {
                return Err(fail());
            };
            meter.scan(s.len(), span)?;
            // Charged before mapping; Unicode case mapping may lengthen the text (by at
            // most three times), and the excess is charged after.
            meter.alloc(s.len(), span)?;
            let mapped = if func == Builtin::Lower {
                s.to_lowercase()
            } else {
                s.to_uppercase()
            };
            meter.alloc(mapped.len().saturating_sub(s.len()), span)?;
            Val::Owned(Value::String(mapped.into()))
        }
        Builtin::Int => match view {
            View::Int(i) => Val::Int(i),
            View::Float(f) => Val::Int(
                float_to_int(f).ok_or_else(|| invalid(format!("{f} does not fit an int"), span))?,
            ),
            View::Str(s) => Val::Int(
                s.parse()
                    .map_err(|_| invalid(format!("{s:?} is not an int"), span))?,
            ),
            _ => return Err(fail()),
        },
        Builtin::Float => match view {
            View::Int(i) => Val::Float(i as f64),
            View::Float(f) => Val::Float(f),
            View::Str(s) => Val::Float(
                s.parse()
                    .map_err(|_| invalid(format!("{s:?} is not a float"), span))?,
            ),
            _ => return Err(fail()),
        },
        Builtin::String => match view {
            View::Str(_) => arg,
            View::Null => owned_string("null".into(), meter, span)?,
            View::Bool(b) => owned_string(b.to_string(), meter, span)?,
            View::Int(i) => owned_string(i.to_string(), meter, span)?,
            View::Float(f) => owned_string(f.to_string(), meter, span)?,
            View::Bytes(b) => {
                let s = std::str::from_utf8(b)
                    .map_err(|_| invalid("bytes are not UTF-8".into(), span))?;
                owned_string(s.to_owned(), meter, span)?
            }
            View::Time(t) => owned_string(crate::time::format_rfc3339(t), meter, span)?,
            View::Duration(d) => owned_string(crate::time::format_duration(d), meter, span)?,
            View::List(_) | View::Map(_) => return Err(fail()),
        },
        Builtin::Bytes => match view {
            View::Bytes(_) => arg,
            View::Str(s) => {
                meter.alloc(s.len(), span)?;
                Val::Owned(Value::Bytes(s.as_bytes().into()))
            }
            _ => return Err(fail()),
        },
        Builtin::Timestamp => match view {
            View::Time(t) => Val::Time(t),
            View::Str(s) => Val::Time(
                crate::time::parse_rfc3339(s)
                    .ok_or_else(|| invalid(format!("{s:?} is not an RFC 3339 timestamp"), span))?,
            ),
            _ => return Err(fail()),
        },
        Builtin::Duration => match view {
            View::Duration(d) => Val::Duration(d),
            View::Str(s) => Val::Duration(
                crate::time::parse_duration(s)
                    .ok_or_else(|| invalid(format!("{s:?} is not a duration"), span))?,
            ),
            _ => return Err(fail()),
        },
        Builtin::Contains | Builtin::StartsWith | Builtin::EndsWith => return Err(fail()),
    })
}

fn call2<'a>(
    func: Builtin,
    a: View<'_>,
    b: View<'_>,
    meter: &mut Meter,
    span: Span,
) -> Result<Val<'a>, EvalError> {
    let (View::Str(s), View::Str(t)) = (a, b) else {
        return Err(no_overload(func.name(), &[&a, &b], span));
    };
    meter.scan(s.len(), span)?;
    Ok(Val::Bool(match func {
        Builtin::Contains => s.contains(t),
        Builtin::StartsWith => s.starts_with(t),
        Builtin::EndsWith => s.ends_with(t),
        _ => return Err(no_overload(func.name(), &[&a, &b], span)),
    }))
}
