//! The compiler: a checked tree ([`TExpr`]) to the evaluable form ([`Node`]).
//!
//! * **Constant folding.** A node whose operands are all constants is evaluated now and
//!   replaced by its value; one whose evaluation fails (`1 / 0`) is kept, so that the
//!   error happens only if evaluation reaches it, as it would have. A conditional with a
//!   constant condition becomes the branch taken. Folding draws on one step and memory
//!   budget for the whole program, so compiling is bounded like evaluating. Loops are not
//!   folded.
//! * **Paths.** `Var.field[0]["key"]` becomes one [`Path`] of prehashed steps.
//! * **Constant comparisons** get specialised nodes; `&&`/`||` chains are flattened.
//! * **Regexes** are built here ([`build_regex`]), called by the checker on each
//!   `matches` literal: once per pattern per compile, never during evaluation.
//! * **Cost.** Every node gets two static costs: the steps of one pass outside loop
//!   bodies, and the worst case including the iterations of loops over literal lists.
//!   A program whose worst case exceeds the step budget is refused here; loops over bound
//!   values are metered while running.

use std::cell::Cell;

use regex::{Regex, RegexBuilder};

use crate::ast::{BinaryOp, Macro, UnaryOp};
use crate::check::{TExpr, TKind};
use crate::error::{CompileError, CompileErrorKind as K, Span};
use crate::eval::{
    ArithNode, ArithOp, BinaryNode, Builtin, Call1Node, Call2Node, CmpIntNode, CmpNode, CmpOp, Env,
    EqStrNode, FieldNode, ListNode, LoopNode, MapNode, MatchesNode, Meter, Node, Operand, Path,
    Root, Step, StepKind, TernaryNode, UnaryNode,
};
use crate::limits::Limits;
use crate::value::{Key, Value};

thread_local! {
    static REGEX_COMPILATIONS: Cell<u64> = const { Cell::new(0) };
}

/// How many regexes this thread has compiled, ever. Only compiling a program compiles
/// regexes; tests use this to prove that evaluating one never does.
pub fn regex_compilations() -> u64 {
    REGEX_COMPILATIONS.with(Cell::get)
}

/// Compiles a `matches` pattern under the regex size limits. The `regex` crate's default
/// syntax is Unicode-aware: `\p{Greek}`, `\w` over all scripts, and `(?i)` with full
/// simple case folding (`(?i)äöü` matches `ÄÖÜ`).
pub(crate) fn build_regex(
    pattern: &str,
    span: Span,
    limits: &Limits,
) -> Result<Regex, CompileError> {
    REGEX_COMPILATIONS.with(|c| c.set(c.get() + 1));
    RegexBuilder::new(pattern)
        .size_limit(limits.regex_bytes_max)
        .dfa_size_limit(limits.regex_bytes_max)
        .build()
        .map_err(|e| {
            let kind = match e {
                regex::Error::CompiledTooBig(_) => K::RegexTooBig {
                    max: limits.regex_bytes_max,
                },
                // The crate's message carries its own excerpt of the pattern; keep the
                // line that says what is wrong.
                other => {
                    let text = other.to_string();
                    let summary = text
                        .lines()
                        .find_map(|l| l.strip_prefix("error: "))
                        .unwrap_or(&text)
                        .to_owned();
                    K::InvalidRegex(summary)
                }
            };
            CompileError::new(kind, span)
        })
}

/// A compiled program's tree and what the runtime needs to know about its cost.
pub(crate) struct Compiled {
    pub root: Node,
    /// Steps of one pass outside loop bodies: already paid for, never metered.
    pub once: u64,
}

pub(crate) fn compile(root: TExpr, limits: &Limits) -> Result<Compiled, CompileError> {
    let span = root.span;
    let mut compiler = Compiler {
        fold_meter: Meter::new(limits.steps_max, limits.memory_bytes_max),
    };
    let lowered = compiler.lower(root);
    if lowered.cost.worst > limits.steps_max {
        return Err(CompileError::new(
            K::CostTooHigh {
                estimate: lowered.cost.worst,
                max: limits.steps_max,
            },
            span,
        ));
    }
    Ok(Compiled {
        root: lowered.node,
        once: lowered.cost.once,
    })
}

/// The static cost of a subtree, in steps.
#[derive(Clone, Copy, Debug)]
struct StaticCost {
    /// One evaluation, loop iterations not counted.
    once: u64,
    /// Worst case, counting the iterations of loops over lists of known length.
    worst: u64,
}

impl StaticCost {
    /// A node over children of these costs.
    fn over(children: &[StaticCost]) -> StaticCost {
        children.iter().fold(StaticCost::LEAF, |a, c| StaticCost {
            once: a.once.saturating_add(c.once),
            worst: a.worst.saturating_add(c.worst),
        })
    }

    const LEAF: StaticCost = StaticCost { once: 1, worst: 1 };
}

struct Lowered {
    node: Node,
    cost: StaticCost,
}

struct Compiler {
    /// Shared by every fold of the program: compile-time evaluation is bounded in total.
    fold_meter: Meter,
}

fn is_const(node: &Node) -> bool {
    matches!(node, Node::Const(_))
}

// One construct per function, as in the parser and checker: lowering recurses over the
// tree, and small frames are what let `DEPTH_MAX` hold in unoptimised builds too.
impl Compiler {
    fn lower(&mut self, e: TExpr) -> Lowered {
        let span = e.span;
        match e.kind {
            TKind::Const(v) => self.leaf(Node::Const(v)),
            TKind::Var(slot) => self.leaf(path(Root::Var(slot), span)),
            TKind::Local(index) => self.leaf(path(Root::Local(index), span)),
            TKind::Field { target, key } => self.field(*target, key, span),
            TKind::Index { target, index } => self.index(*target, *index, span),
            TKind::Has { target, key } => self.has(*target, key, span),
            TKind::Unary { op, operand } => self.unary(op, *operand, span),
            TKind::Binary { op, lhs, rhs } => self.binary(op, *lhs, *rhs, span),
            TKind::Ternary {
                cond,
                then,
                otherwise,
            } => self.ternary(*cond, *then, *otherwise),
            TKind::List(items) => self.list(items, span),
            TKind::Map(entries) => self.map(entries, span),
            TKind::Call { func, args } => self.call(func, args, span),
            TKind::Matches { target, regex } => self.matches(*target, *regex, span),
            TKind::Loop {
                kind,
                range,
                local,
                body,
            } => self.comprehension(kind, *range, local, *body, span),
        }
    }

    fn leaf(&mut self, node: Node) -> Lowered {
        Lowered {
            node,
            cost: StaticCost::LEAF,
        }
    }

    /// Folds `node` and costs it over `children`.
    fn finish(&mut self, node: Node, children: &[StaticCost]) -> Lowered {
        Lowered {
            node: self.fold(node),
            cost: StaticCost::over(children),
        }
    }

    fn field(&mut self, target: TExpr, key: Key, span: Span) -> Lowered {
        let target = self.lower(target);
        match target.node {
            Node::Path(mut p) => {
                p.steps.push(Step {
                    kind: StepKind::Field(key),
                    span,
                });
                p.span = span;
                Lowered {
                    node: Node::Path(p),
                    cost: StaticCost::over(&[target.cost]),
                }
            }
            node => {
                let field = Node::Field(Box::new(FieldNode {
                    target: node,
                    key,
                    span,
                }));
                self.finish(field, &[target.cost])
            }
        }
    }

    fn index(&mut self, target: TExpr, index: TExpr, span: Span) -> Lowered {
        let target = self.lower(target);
        let index = self.lower(index);
        match (target.node, index.node) {
            (Node::Path(mut p), Node::Const(Value::Int(i))) => {
                p.steps.push(Step {
                    kind: StepKind::Index(i),
                    span,
                });
                p.span = span;
                // The constant index costs nothing at run time.
                Lowered {
                    node: Node::Path(p),
                    cost: StaticCost::over(&[target.cost]),
                }
            }
            (lhs, rhs) => {
                let node = Node::Index(Box::new(BinaryNode { lhs, rhs, span }));
                self.finish(node, &[target.cost, index.cost])
            }
        }
    }

    fn has(&mut self, target: TExpr, key: Key, span: Span) -> Lowered {
        let target = self.lower(target);
        let node = Node::Has(Box::new(FieldNode {
            target: target.node,
            key,
            span,
        }));
        self.finish(node, &[target.cost])
    }

    fn unary(&mut self, op: UnaryOp, operand: TExpr, span: Span) -> Lowered {
        let operand = self.lower(operand);
        let inner = Box::new(UnaryNode {
            operand: operand.node,
            span,
        });
        let node = match op {
            UnaryOp::Not => Node::Not(inner),
            UnaryOp::Neg => Node::Neg(inner),
        };
        self.finish(node, &[operand.cost])
    }

    fn ternary(&mut self, cond: TExpr, then: TExpr, otherwise: TExpr) -> Lowered {
        let cond_span = cond.span;
        let cond = self.lower(cond);
        // A constant condition leaves only the branch taken (the other was type-checked).
        if let Node::Const(Value::Bool(b)) = cond.node {
            return self.lower(if b { then } else { otherwise });
        }
        let then = self.lower(then);
        let otherwise = self.lower(otherwise);
        let node = Node::Ternary(Box::new(TernaryNode {
            cond: Operand {
                node: cond.node,
                span: cond_span,
            },
            then: then.node,
            otherwise: otherwise.node,
        }));
        self.finish(node, &[cond.cost, then.cost, otherwise.cost])
    }

    fn list(&mut self, items: Vec<TExpr>, span: Span) -> Lowered {
        let mut costs = Vec::with_capacity(items.len());
        let mut nodes = Vec::with_capacity(items.len());
        for item in items {
            let item = self.lower(item);
            costs.push(item.cost);
            nodes.push(item.node);
        }
        let node = Node::List(Box::new(ListNode { items: nodes, span }));
        self.finish(node, &costs)
    }

    fn map(&mut self, entries: Vec<(TExpr, TExpr)>, span: Span) -> Lowered {
        let mut costs = Vec::with_capacity(entries.len() * 2);
        let mut nodes = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let (k, v) = (self.lower(k), self.lower(v));
            costs.extend([k.cost, v.cost]);
            nodes.push((k.node, v.node));
        }
        let node = Node::Map(Box::new(MapNode {
            entries: nodes,
            span,
        }));
        self.finish(node, &costs)
    }

    fn call(&mut self, func: Builtin, args: Vec<TExpr>, span: Span) -> Lowered {
        let mut args: Vec<Lowered> = args.into_iter().map(|a| self.lower(a)).collect();
        let costs: Vec<StaticCost> = args.iter().map(|a| a.cost).collect();
        let b = args.pop();
        let a = args.pop();
        let node = match (a, b) {
            (Some(a), Some(b)) => Node::Call2(Box::new(Call2Node {
                func,
                a: a.node,
                b: b.node,
                span,
            })),
            (None, Some(arg)) => Node::Call1(Box::new(Call1Node {
                func,
                arg: arg.node,
                span,
            })),
            // The checker admits one or two arguments only.
            _ => Node::Const(Value::Null),
        };
        self.finish(node, &costs)
    }

    fn matches(&mut self, target: TExpr, regex: Regex, span: Span) -> Lowered {
        let target = self.lower(target);
        let node = Node::Matches(Box::new(MatchesNode {
            target: target.node,
            regex,
            span,
        }));
        self.finish(node, &[target.cost])
    }

    fn comprehension(
        &mut self,
        kind: Macro,
        range: TExpr,
        local: u32,
        body: TExpr,
        span: Span,
    ) -> Lowered {
        let body_span = body.span;
        let range = self.lower(range);
        let body = self.lower(body);
        let known_len = match &range.node {
            Node::Const(Value::List(l)) => l.len(),
            Node::Const(Value::Map(m)) => m.len(),
            Node::List(l) => l.items.len(),
            Node::Map(m) => m.entries.len(),
            _ => 0,
        };
        let iteration = StaticCost::over(&[body.cost]);
        let cost = StaticCost {
            once: range.cost.once.saturating_add(1),
            worst: (known_len as u64)
                .saturating_mul(iteration.worst)
                .saturating_add(range.cost.worst)
                .saturating_add(1),
        };
        let node = Node::Loop(Box::new(LoopNode {
            kind,
            range: range.node,
            local,
            body: body.node,
            body_span,
            iteration_cost: iteration.once,
            span,
        }));
        // Not folded: a loop's cost depends on its range, and folding one would spend the
        // compile-time budget on what the static estimate exists to refuse.
        Lowered { node, cost }
    }

    fn binary(&mut self, op: BinaryOp, lhs: TExpr, rhs: TExpr, span: Span) -> Lowered {
        let (lhs_span, rhs_span) = (lhs.span, rhs.span);
        let lhs = self.lower(lhs);
        let rhs = self.lower(rhs);
        let costs = [lhs.cost, rhs.cost];
        let node = match op {
            BinaryOp::And | BinaryOp::Or => {
                let is_and = op == BinaryOp::And;
                let mut operands = Vec::new();
                for (node, span) in [(lhs.node, lhs_span), (rhs.node, rhs_span)] {
                    // `a && b && c` parses as `(a && b) && c`: one node of three operands
                    // evaluates without the nested frame.
                    match node {
                        Node::And(inner) if is_and => operands.extend(inner.into_vec()),
                        Node::Or(inner) if !is_and => operands.extend(inner.into_vec()),
                        node => operands.push(Operand { node, span }),
                    }
                }
                let operands = operands.into_boxed_slice();
                if is_and {
                    Node::And(operands)
                } else {
                    Node::Or(operands)
                }
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Rem => {
                let op = match op {
                    BinaryOp::Add => ArithOp::Add,
                    BinaryOp::Sub => ArithOp::Sub,
                    BinaryOp::Mul => ArithOp::Mul,
                    BinaryOp::Div => ArithOp::Div,
                    _ => ArithOp::Rem,
                };
                Node::Arith(Box::new(ArithNode {
                    op,
                    lhs: lhs.node,
                    rhs: rhs.node,
                    span,
                }))
            }
            BinaryOp::In => Node::In(Box::new(BinaryNode {
                lhs: lhs.node,
                rhs: rhs.node,
                span,
            })),
            BinaryOp::Eq => comparison(CmpOp::Eq, lhs.node, rhs.node, span),
            BinaryOp::Ne => comparison(CmpOp::Ne, lhs.node, rhs.node, span),
            BinaryOp::Lt => comparison(CmpOp::Lt, lhs.node, rhs.node, span),
            BinaryOp::Le => comparison(CmpOp::Le, lhs.node, rhs.node, span),
            BinaryOp::Gt => comparison(CmpOp::Gt, lhs.node, rhs.node, span),
            BinaryOp::Ge => comparison(CmpOp::Ge, lhs.node, rhs.node, span),
        };
        self.finish(node, &costs)
    }

    /// Evaluates `node` now if all its operands are constants.
    fn fold(&mut self, node: Node) -> Node {
        if !operands_const(&node) {
            return node;
        }
        let env = Env {
            slots: &[],
            names: &[],
        };
        match node.eval(&env, &mut self.fold_meter, None) {
            Ok(v) => Node::Const(v.into_value()),
            Err(_) => node,
        }
    }
}

fn path(root: Root, span: Span) -> Node {
    Node::Path(Box::new(Path {
        root,
        root_span: span,
        steps: Vec::new(),
        span,
    }))
}

/// A comparison, specialised when one side is a string or integer literal.
fn comparison(op: CmpOp, lhs: Node, rhs: Node, span: Span) -> Node {
    let (op, lhs, rhs) = match (&lhs, &rhs) {
        (Node::Const(_), r) if !is_const(r) => (op.flipped(), rhs, lhs),
        _ => (op, lhs, rhs),
    };
    match rhs {
        Node::Const(literal @ Value::String(_)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
            Node::EqStr(Box::new(EqStrNode {
                lhs,
                literal,
                negate: op == CmpOp::Ne,
                span,
            }))
        }
        Node::Const(Value::Int(literal)) if !is_const(&lhs) => Node::CmpInt(Box::new(CmpIntNode {
            op,
            lhs,
            literal,
            span,
        })),
        rhs => Node::Cmp(Box::new(CmpNode { op, lhs, rhs, span })),
    }
}

fn operands_const(node: &Node) -> bool {
    match node {
        Node::Const(_) | Node::Path(_) | Node::Loop(_) => false,
        Node::Field(n) | Node::Has(n) => is_const(&n.target),
        Node::Index(n) | Node::In(n) => is_const(&n.lhs) && is_const(&n.rhs),
        Node::Not(n) | Node::Neg(n) => is_const(&n.operand),
        Node::And(ops) | Node::Or(ops) => ops.iter().all(|o| is_const(&o.node)),
        Node::Arith(n) => is_const(&n.lhs) && is_const(&n.rhs),
        Node::Cmp(n) => is_const(&n.lhs) && is_const(&n.rhs),
        Node::EqStr(n) => is_const(&n.lhs),
        Node::CmpInt(n) => is_const(&n.lhs),
        Node::Ternary(n) => is_const(&n.cond.node) && is_const(&n.then) && is_const(&n.otherwise),
        Node::List(n) => n.items.iter().all(is_const),
        Node::Map(n) => n.entries.iter().all(|(k, v)| is_const(k) && is_const(v)),
        Node::Call1(n) => is_const(&n.arg),
        Node::Call2(n) => is_const(&n.a) && is_const(&n.b),
        Node::Matches(n) => is_const(&n.target),
    }
}
