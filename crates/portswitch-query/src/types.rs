//! Types and schemas.
//!
//! A [`Schema`] declares the types of a query's variables, as deep as the caller knows
//! them: `Segments: list({Origin: string})`. Whatever it does not declare — a variable, a
//! field of a record, an element of a `dyn` list — is [`Type::Dyn`], checked at run time.
//! A schema can instead be made strict ([`Schema::declared_only`]), so that a misspelt
//! variable is a compile error.
//!
//! Map keys are always strings (a [`crate::Value::Map`] has `Arc<str>` keys), so a map
//! type names only its value type; a [`Record`] is a map whose fields are individually
//! typed. Records are open: a field the record does not declare has type `dyn`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The static type of an expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    /// Unknown until run time.
    Dyn,
    /// The type of `null`.
    Null,
    /// `bool`
    Bool,
    /// `int`
    Int,
    /// `float`
    Float,
    /// `string`
    String,
    /// `bytes`
    Bytes,
    /// `timestamp`
    Time,
    /// `duration`
    Duration,
    /// `list(T)`
    List(Arc<Type>),
    /// `map(string, V)`
    Map(Arc<Type>),
    /// A map with declared fields.
    Record(Arc<Record>),
}

impl Type {
    /// `list(element)`
    pub fn list(element: Type) -> Type {
        Type::List(Arc::new(element))
    }

    /// `map(string, value)`
    pub fn map(value: Type) -> Type {
        Type::Map(Arc::new(value))
    }

    /// A record with the given fields.
    pub fn record<N: Into<String>>(fields: impl IntoIterator<Item = (N, Type)>) -> Type {
        Type::Record(Arc::new(Record {
            fields: fields.into_iter().map(|(n, t)| (n.into(), t)).collect(),
        }))
    }

    pub(crate) fn is_dyn(&self) -> bool {
        matches!(self, Type::Dyn)
    }

    /// `self` is `Dyn` or satisfies `pred`: the check every operand goes through.
    pub(crate) fn may_be(&self, pred: impl Fn(&Type) -> bool) -> bool {
        self.is_dyn() || pred(self)
    }

    pub(crate) fn is_numeric(&self) -> bool {
        matches!(self, Type::Int | Type::Float)
    }

    pub(crate) fn is_map_like(&self) -> bool {
        matches!(self, Type::Map(_) | Type::Record(_))
    }

    /// The type of a value that may come from either branch: the common type, or `dyn`.
    pub(crate) fn unify(&self, other: &Type) -> Type {
        if self == other {
            self.clone()
        } else {
            Type::Dyn
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Dyn => f.write_str("dyn"),
            Type::Null => f.write_str("null"),
            Type::Bool => f.write_str("bool"),
            Type::Int => f.write_str("int"),
            Type::Float => f.write_str("float"),
            Type::String => f.write_str("string"),
            Type::Bytes => f.write_str("bytes"),
            Type::Time => f.write_str("timestamp"),
            Type::Duration => f.write_str("duration"),
            Type::List(t) => write!(f, "list({t})"),
            Type::Map(v) => write!(f, "map(string, {v})"),
            Type::Record(r) => {
                f.write_str("{")?;
                for (i, (name, t)) in r.fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{name}: {t}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// The declared fields of a record type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    fields: Vec<(String, Type)>,
}

impl Record {
    /// The type of a declared field.
    pub fn field(&self, name: &str) -> Option<&Type> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// The variables a query may use, with their types.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    vars: HashMap<String, Type>,
    declared_only: bool,
}

impl Schema {
    /// An empty schema: every variable is `dyn`.
    pub fn new() -> Schema {
        Schema::default()
    }

    /// Declares `name: ty` (builder style).
    pub fn with(mut self, name: impl Into<String>, ty: Type) -> Schema {
        self.insert(name, ty);
        self
    }

    /// Declares `name: ty`.
    pub fn insert(&mut self, name: impl Into<String>, ty: Type) {
        self.vars.insert(name.into(), ty);
    }

    /// Makes undeclared variables a compile error instead of `dyn`.
    pub fn declared_only(mut self) -> Schema {
        self.declared_only = true;
        self
    }

    /// The declared type of `name`.
    pub fn get(&self, name: &str) -> Option<&Type> {
        self.vars.get(name)
    }

    pub(crate) fn is_declared_only(&self) -> bool {
        self.declared_only
    }
}
