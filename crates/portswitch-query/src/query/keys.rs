//! Values as keys: a hash consistent with the language's equality (for GROUP BY,
//! DISTINCT and hash joins) and a total order (for ORDER BY).

use std::cmp::Ordering;
use std::hash::{BuildHasher, Hasher};

use foldhash::fast::FixedState;

use crate::value::Value;

/// Hashes a tuple of values so that tuples equal under `==` hash alike: an int and a
/// float of the same value (`1 == 1.0`) hash alike, and maps hash independently of the
/// order of their entries.
pub(crate) fn hash_values(values: &[Value]) -> u64 {
    let mut h = FixedState::with_seed(0x5eed).build_hasher();
    for v in values {
        hash_value(v, &mut h, 0);
    }
    h.finish()
}

/// Deeper values hash as their kind alone: still consistent with equality.
const HASH_DEPTH_MAX: usize = 32;

fn hash_value(v: &Value, h: &mut impl Hasher, depth: usize) {
    match v {
        Value::Null => h.write_u8(0),
        Value::Bool(b) => {
            h.write_u8(1);
            h.write_u8(u8::from(*b));
        }
        Value::Int(i) => {
            h.write_u8(2);
            h.write_i64(*i);
        }
        Value::Float(f) => {
            // An integral float in the i64 range equals that int: hash it as one.
            // `-0.0` and `0.0` are equal and both land here.
            if f.fract() == 0.0 && *f >= -9.223_372_036_854_776e18 && *f < 9.223_372_036_854_776e18
            {
                h.write_u8(2);
                h.write_i64(*f as i64);
            } else {
                h.write_u8(3);
                h.write_u64(f.to_bits());
            }
        }
        Value::String(s) => {
            h.write_u8(4);
            h.write(s.as_bytes());
            h.write_u8(0xff);
        }
        Value::Bytes(b) => {
            h.write_u8(5);
            h.write_usize(b.len());
            h.write(b);
        }
        Value::Time(t) => {
            h.write_u8(6);
            h.write_i64(*t);
        }
        Value::Duration(d) => {
            h.write_u8(7);
            h.write_i64(*d);
        }
        Value::List(items) => {
            h.write_u8(8);
            h.write_usize(items.len());
            if depth < HASH_DEPTH_MAX {
                for item in items.iter() {
                    hash_value(item, h, depth + 1);
                }
            }
        }
        Value::Map(m) => {
            h.write_u8(9);
            h.write_usize(m.len());
            if depth < HASH_DEPTH_MAX {
                // Entry order does not matter to equality: combine commutatively.
                let mut sum = 0u64;
                for (k, v) in m.iter() {
                    let mut eh = FixedState::with_seed(0x6a7).build_hasher();
                    eh.write(k.as_bytes());
                    hash_value(v, &mut eh, depth + 1);
                    sum = sum.wrapping_add(eh.finish());
                }
                h.write_u64(sum);
            }
        }
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Int(_) | Value::Float(_) => 2,
        Value::String(_) => 3,
        Value::Bytes(_) => 4,
        Value::Time(_) => 5,
        Value::Duration(_) => 6,
        Value::List(_) => 7,
        Value::Map(_) => 8,
    }
}

/// A total order over all values, for sorting: by kind first (null, bool, number,
/// string, bytes, timestamp, duration, list, map), then by value; NaN after every other
/// number; lists lexicographically; maps by size only (they have no natural order).
pub(crate) fn total_cmp(a: &Value, b: &Value) -> Ordering {
    let by_rank = rank(a).cmp(&rank(b));
    if by_rank != Ordering::Equal {
        return by_rank;
    }
    match (a, b) {
        (Value::List(x), Value::List(y)) => {
            for (p, q) in x.iter().zip(y.iter()) {
                let o = total_cmp(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Map(x), Value::Map(y)) => x.len().cmp(&y.len()),
        _ => a.compare(b).unwrap_or_else(|| {
            // Only NaN is unordered within a rank.
            let a_nan = matches!(a, Value::Float(f) if f.is_nan());
            let b_nan = matches!(b, Value::Float(f) if f.is_nan());
            a_nan.cmp(&b_nan)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_hash_alike() {
        let pairs = [
            (Value::Int(1), Value::Float(1.0)),
            (Value::Float(-0.0), Value::Int(0)),
            (
                Value::map([("a", 1), ("b", 2)]),
                Value::map([("b", 2.0), ("a", 1.0)]),
            ),
            (Value::list([1, 2]), Value::list([1.0, 2.0])),
        ];
        for (a, b) in pairs {
            assert_eq!(a, b);
            assert_eq!(
                hash_values(std::slice::from_ref(&a)),
                hash_values(std::slice::from_ref(&b))
            );
        }
        assert_ne!(
            hash_values(&[Value::from("ab"), Value::from("c")]),
            hash_values(&[Value::from("a"), Value::from("bc")])
        );
    }

    #[test]
    fn the_order_is_total() {
        let mut values = [
            Value::from("b"),
            Value::Float(f64::NAN),
            Value::Int(3),
            Value::Null,
            Value::Float(2.5),
            Value::from("a"),
            Value::Bool(true),
        ];
        values.sort_by(total_cmp);
        let shown: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        assert_eq!(shown, ["null", "true", "2.5", "3", "NaN", "\"a\"", "\"b\""]);
    }
}
