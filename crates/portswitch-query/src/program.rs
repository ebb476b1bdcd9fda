//! [`Program`]: a compiled query, and [`Bindings`]: the variables of one evaluation.
//!
//! Variables are resolved to slots when the program is compiled, so evaluation never
//! looks a name up. Bindings borrow the caller's values and hold them in a fixed array
//! (spilling to the heap only for programs with more than [`INLINE_SLOTS`] variables), so
//! making fresh bindings per evaluation allocates nothing and clones nothing — not even
//! a reference count. This was chosen over evaluating against one root record, whose
//! construction per evaluation would allocate a map; a caller who has such a record can
//! bind from it directly ([`Bindings::set_from_map`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ast::Expr;
use crate::check::check;
use crate::compile::compile;
use crate::error::{CompileError, EvalError, EvalErrorKind, Span};
use crate::eval::{Env, Meter, Node};
use crate::limits::Limits;
use crate::parser::parse;
use crate::types::{Schema, Type};
use crate::value::{Key, Map, Value};

/// Programs with at most this many variables keep their bindings inline.
pub const INLINE_SLOTS: usize = 8;

/// Distinguishes programs, so that bindings made by one are refused by another.
static NEXT_PROGRAM_ID: AtomicU64 = AtomicU64::new(1);

/// A compiled query. Immutable and `Send + Sync`: compile once, evaluate from any number
/// of threads.
#[derive(Debug)]
pub struct Program {
    id: u64,
    source: Arc<str>,
    root: Node,
    /// Variable names by slot, hashed for [`Bindings::set_from_map`].
    vars: Box<[Key]>,
    result_type: Type,
    regexes: usize,
    /// What is left of the step budget after one pass outside loops (paid statically).
    steps_budget: u64,
    memory_budget: u64,
    span: Span,
}

/// A variable's position in a program's bindings: resolve a name once with
/// [`Program::slot`], then bind by slot with no string comparison at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    program: u64,
    index: u32,
}

impl Program {
    /// Parses, type-checks and compiles `source`. Every regex literal is compiled here
    /// (and only here).
    pub fn compile(
        source: &str,
        schema: &Schema,
        limits: &Limits,
    ) -> Result<Program, CompileError> {
        Program::compile_unlocated(source, schema, limits).map_err(|e| e.locate(source))
    }

    fn compile_unlocated(
        source: &str,
        schema: &Schema,
        limits: &Limits,
    ) -> Result<Program, CompileError> {
        let expr = parse(source, limits)?;
        Program::from_expr(&expr, source.into(), schema, limits)
    }

    /// Compiles a tree that is part of a larger `source` (a statement's clause): errors
    /// and evaluation errors point into `source`. Errors are not located yet.
    pub(crate) fn from_expr(
        expr: &Expr,
        source: Arc<str>,
        schema: &Schema,
        limits: &Limits,
    ) -> Result<Program, CompileError> {
        let span = expr.span;
        let checked = check(expr, schema, limits)?;
        let result_type = checked.root.ty.clone();
        let compiled = compile(checked.root, limits)?;
        Ok(Program {
            id: NEXT_PROGRAM_ID.fetch_add(1, Ordering::Relaxed),
            source,
            root: compiled.root,
            vars: checked.vars.into_iter().map(Key::new).collect(),
            result_type,
            regexes: checked.regexes,
            steps_budget: limits.steps_max.saturating_sub(compiled.once),
            memory_budget: limits.memory_bytes_max,
            span,
        })
    }

    /// Empty bindings for this program.
    #[inline]
    pub fn bindings(&self) -> Bindings<'_> {
        let slots = if self.vars.len() <= INLINE_SLOTS {
            SlotStore::Inline([None; INLINE_SLOTS])
        } else {
            SlotStore::Heap(vec![None; self.vars.len()])
        };
        Bindings {
            program: self.id,
            names: &self.vars,
            slots,
        }
    }

    /// The slot of variable `name`, if the program reads it.
    pub fn slot(&self, name: &str) -> Option<Slot> {
        let index = self.vars.iter().position(|k| k.name() == name)?;
        Some(Slot {
            program: self.id,
            index: u32::try_from(index).ok()?,
        })
    }

    /// The variables the program reads, in slot order.
    pub fn variables(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.vars.iter().map(Key::name)
    }

    /// The static type of the result (`dyn` where the schema left it open).
    pub fn result_type(&self) -> &Type {
        &self.result_type
    }

    /// How many regexes compiling this program compiled (one per `matches` literal).
    /// Evaluation compiles none.
    pub fn regexes_compiled(&self) -> usize {
        self.regexes
    }

    /// The span of the expression in its source.
    pub(crate) fn span(&self) -> Span {
        self.span
    }

    /// The source it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn run<T>(
        &self,
        bindings: &Bindings<'_>,
        f: impl FnOnce(&Node, &Env<'_>, &mut Meter) -> Result<T, EvalError>,
    ) -> Result<T, EvalError> {
        if bindings.program != self.id {
            return Err(
                EvalError::new(EvalErrorKind::ForeignBindings, self.span).locate(&self.source)
            );
        }
        let env = Env {
            slots: bindings.slots(),
            names: &self.vars,
        };
        let mut meter = Meter::new(self.steps_budget, self.memory_budget);
        f(&self.root, &env, &mut meter).map_err(|e| e.locate(&self.source))
    }

    /// Evaluates the program.
    pub fn eval(&self, bindings: &Bindings<'_>) -> Result<Value, EvalError> {
        self.run(bindings, |root, env, meter| {
            root.eval(env, meter, None).map(|v| v.into_value())
        })
    }

    /// Evaluates a predicate: a result that is not a bool is a type mismatch. Allocates
    /// nothing unless the expression itself builds values (string concatenation, list
    /// literals with variables, `map`/`filter`) or fails.
    #[inline]
    pub fn eval_bool(&self, bindings: &Bindings<'_>) -> Result<bool, EvalError> {
        let span = self.span;
        self.run(bindings, |root, env, meter| {
            root.eval_bool(env, meter, None, span)
        })
    }
}

#[derive(Debug)]
enum SlotStore<'a> {
    Inline([Option<&'a Value>; INLINE_SLOTS]),
    Heap(Vec<Option<&'a Value>>),
}

/// The values of a program's variables for one or more evaluations, borrowed from the
/// caller. Made by [`Program::bindings`]; a variable left unset is an
/// [`EvalErrorKind::Unbound`] error if evaluation reads it.
#[derive(Debug)]
pub struct Bindings<'a> {
    program: u64,
    names: &'a [Key],
    slots: SlotStore<'a>,
}

impl<'a> Bindings<'a> {
    /// Binds `name`. Returns whether the program reads it (binding a variable the
    /// program does not use is harmless and ignored).
    #[inline]
    pub fn set(&mut self, name: &str, value: &'a Value) -> bool {
        match self.names.iter().position(|k| k.name() == name) {
            Some(index) => self.put(index, value),
            None => false,
        }
    }

    /// Binds by slot. Returns false for a slot of another program.
    #[inline]
    pub fn set_slot(&mut self, slot: Slot, value: &'a Value) -> bool {
        slot.program == self.program && self.put(slot.index as usize, value)
    }

    /// Binds every variable that `record` has a key for (prehashed lookups, no hashing)
    /// and returns how many it bound.
    pub fn set_from_map(&mut self, record: &'a Map) -> usize {
        let names = self.names;
        let mut bound = 0;
        for (index, key) in names.iter().enumerate() {
            if let Some(v) = record.get_key(key) {
                bound += usize::from(self.put(index, v));
            }
        }
        bound
    }

    /// Unbinds everything.
    pub fn clear(&mut self) {
        match &mut self.slots {
            SlotStore::Inline(s) => s.fill(None),
            SlotStore::Heap(s) => s.fill(None),
        }
    }

    #[inline]
    fn put(&mut self, index: usize, value: &'a Value) -> bool {
        let slot = match &mut self.slots {
            SlotStore::Inline(s) => s.get_mut(index),
            SlotStore::Heap(s) => s.get_mut(index),
        };
        match slot {
            Some(slot) => {
                *slot = Some(value);
                true
            }
            None => false,
        }
    }

    #[inline]
    fn slots(&self) -> &[Option<&'a Value>] {
        match &self.slots {
            SlotStore::Inline(s) => s,
            SlotStore::Heap(s) => s,
        }
    }
}
