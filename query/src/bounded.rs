//! Value-building SQL functions that charge what they build to their query's memory budget.
//!
//! DataFusion accounts the memory of sorts, joins and aggregations in the query's memory pool, but
//! not the arrays a scalar function returns. A few functions build values far larger than their
//! input (`repeat('x', 600000000)` is 600 MB from 25 bytes of SQL; nested `concat(x, x, x, …)`
//! grows geometrically). Each of those is registered in every query context wrapped in
//! [`Bounded`]: before the real function runs, the wrapper estimates an upper bound of the bytes it
//! will produce from its arguments and reserves them in the query's pool. The reservation lives as
//! long as the query, so the sum of everything these functions build in one query stays within
//! the query's memory limit (and, through the pool, the process-wide one). A refusal is
//! `ResourcesExhausted`, which the service answers as `query_too_large`, before anything is
//! allocated.
//!
//! Invariant: the estimate is never below what the function can return for those arguments.
//! Functions whose output cannot be bounded cheaply from their arguments (`levenshtein`,
//! `array_repeat`, `range`, …) are refused by the SQL gate instead (see `guard.rs`).

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::logical_expr::{ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature};
use datafusion::prelude::SessionContext;

/// How a function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: `len(s) × n`.
    Repeat,
    /// `lpad/rpad(s, n [, fill])`: `n` characters of up to 4 bytes.
    Pad,
    /// `replace(s, from, to)`: every `from` (or, when empty, every gap) becomes `to`.
    Replace,
    /// `regexp_replace(s, pattern, replacement [, flags])`: at most one match per position, each
    /// replaced by the replacement with group references expanded.
    RegexpReplace,
    /// `translate(s, from, to)`: each character may become one of up to 4 bytes.
    Translate,
    /// `concat`, `concat_ws`, `overlay`: no more than the arguments (a separator once per
    /// argument).
    SumOfArguments,
    /// `encode(s, format)`: hex doubles, base64 adds a third.
    Encode,
    /// `array_to_string(list, sep [, null])`: the elements' text plus a separator each.
    ListToString,
}

impl Growth {
    fn of(name: &str) -> Option<Growth> {
        Some(match name {
            "repeat" => Growth::Repeat,
            "lpad" | "rpad" => Growth::Pad,
            "replace" => Growth::Replace,
            "regexp_replace" => Growth::RegexpReplace,
            "translate" => Growth::Translate,
            "concat" | "concat_ws" | "overlay" => Growth::SumOfArguments,
            "encode" => Growth::Encode,
            "array_to_string" => Growth::ListToString,
            _ => return None,
        })
    }

    /// An upper bound of the bytes the function returns for `args` over `rows` rows.
    fn estimate(self, args: &[ColumnarValue], rows: usize) -> Result<u128> {
        // A scalar stays one row (never `rows` copies of it); `row` maps every row to it.
        let args: Vec<ArrayRef> = args
            .iter()
            .map(|a| match a {
                ColumnarValue::Array(array) => Ok(Arc::clone(array)),
                ColumnarValue::Scalar(value) => value.to_array(),
            })
            .collect::<Result<_>>()?;
        let len = |a: usize, i: usize| args.get(a).map_or(0, |arr| text_len(arr, i)) as u128;
        let int = |a: usize| -> Result<Option<ArrayRef>> { args.get(a).map(|arr| cast(arr, &DataType::Int64).map_err(DataFusionError::from)).transpose() };
        let mut total: u128 = 0;
        match self {
            Growth::Repeat | Growth::Pad => {
                let counts = int(1)?;
                let counts = counts.as_ref().map(|c| c.as_primitive::<Int64Type>());
                for i in 0..rows {
                    let n = counts.map_or(0, |c| {
                        let r = row(c.len(), i);
                        if r >= c.len() || c.is_null(r) {
                            0
                        } else {
                            c.value(r).max(0)
                        }
                    }) as u128;
                    total += match self {
                        Growth::Repeat => len(0, i) * n,
                        _ => n * 4,
                    };
                }
            }
            Growth::Replace => {
                for i in 0..rows {
                    let (s, from, to) = (len(0, i), len(1, i), len(2, i));
                    let places = if from == 0 { s + 1 } else { s / from + 1 };
                    total += s + places * to;
                }
            }
            Growth::RegexpReplace => {
                for i in 0..rows {
                    let (s, replacement) = (len(0, i), len(2, i));
                    // Empty matches can occur at every position; a group reference copies at
                    // most the match, and matches do not overlap.
                    total += s + 2 * (s + 1) * (replacement + 1);
                }
            }
            Growth::Translate => (0..rows).for_each(|i| total += 4 * len(0, i)),
            Growth::Encode => (0..rows).for_each(|i| total += 2 * len(0, i) + 4),
            Growth::SumOfArguments => {
                for i in 0..rows {
                    let parts: u128 = (0..args.len()).map(|a| len(a, i)).sum();
                    total += parts + len(0, i) * args.len() as u128;
                }
            }
            Growth::ListToString => {
                let Some(list) = args.first() else { return Ok(0) };
                let per_element = len(1, 0) + len(2, 0) + 1;
                let (elements, text) = list_sizes(list);
                total = elements * (per_element + 24) + text;
            }
        }
        Ok(total)
    }
}

/// The index of row `i` in an argument of `len` rows (a scalar is one row for all).
fn row(len: usize, i: usize) -> usize {
    if len == 1 {
        0
    } else {
        i
    }
}

/// The byte length of row `i` of a text or binary array (0 for other types and nulls).
fn text_len(array: &ArrayRef, i: usize) -> usize {
    let i = row(array.len(), i);
    if i >= array.len() || array.is_null(i) {
        return 0;
    }
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(i).len(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(i).len(),
        DataType::Utf8View => array.as_string_view().value(i).len(),
        DataType::Binary => array.as_binary::<i32>().value(i).len(),
        DataType::LargeBinary => array.as_binary::<i64>().value(i).len(),
        DataType::BinaryView => array.as_binary_view().value(i).len(),
        _ => 0,
    }
}

/// Elements of a list array and the bytes of its text elements.
fn list_sizes(array: &ArrayRef) -> (u128, u128) {
    let values = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().values().clone(),
        DataType::LargeList(_) => array.as_list::<i64>().values().clone(),
        DataType::FixedSizeList(..) => array.as_fixed_size_list().values().clone(),
        _ => return (0, 0),
    };
    let text: u128 = (0..values.len()).map(|i| text_len(&values, i) as u128).sum();
    (values.len() as u128, text)
}

/// What one query's value-building functions have reserved so far.
#[derive(Debug)]
struct Built(Mutex<MemoryReservation>);

/// A value-building function whose output is reserved in the query's memory pool first.
#[derive(Debug)]
pub struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    built: Arc<Built>,
}

impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        self.inner.name() == other.inner.name() && Arc::ptr_eq(&self.built, &other.built)
    }
}

impl Eq for Bounded {}

impl Hash for Bounded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.name().hash(state);
        self.growth.hash(state);
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        // A reconfigured function stays bounded.
        let inner = Arc::new(self.inner.inner().with_updated_config(config)?);
        Some(ScalarUDF::new_from_impl(Bounded { inner, growth: self.growth, built: Arc::clone(&self.built) }))
    }

    // `simplify` is deliberately not forwarded: a simplified expression names the unwrapped
    // function and would escape the bound. Constant folding still runs, through this wrapper.

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bytes = self.growth.estimate(&args.args, args.number_rows)?;
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        self.built.0.lock().unwrap_or_else(PoisonError::into_inner).try_grow(bytes).map_err(|_| {
            DataFusionError::ResourcesExhausted(format!(
                "{}() would build up to {bytes} bytes, more than this query's memory limit leaves; narrow the rows or the values first",
                self.inner.name()
            ))
        })?;
        self.inner.invoke_with_args(args)
    }
}

/// The value-building functions of a fresh context, to be wrapped per query.
#[derive(Debug, Clone)]
pub struct Builders(Vec<(Arc<ScalarUDF>, Growth)>);

impl Builders {
    /// The functions DataFusion registers by default that [`Growth`] knows.
    pub fn of_default_context() -> Builders {
        let ctx = SessionContext::new();
        let state = ctx.state();
        Builders(state.scalar_functions().values().filter_map(|f| Growth::of(f.name()).map(|g| (Arc::clone(f), g))).collect())
    }

    /// Registers the bounded versions in `ctx`, charging `pool` (the query's pool).
    pub fn register(&self, ctx: &SessionContext, pool: &Arc<dyn MemoryPool>) {
        let built = Arc::new(Built(Mutex::new(MemoryConsumer::new("value-building functions").register(pool))));
        for (inner, growth) in &self.0 {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded { inner: Arc::clone(inner), growth: *growth, built: Arc::clone(&built) }));
        }
    }

    /// Names of the wrapped functions.
    #[cfg(test)]
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(f, _)| f.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::common::ScalarValue;

    fn scalar(s: &str) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(s.into())))
    }

    fn int(n: i64) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(n)))
    }

    #[test]
    fn estimates_bound_the_output() {
        assert_eq!(Growth::Repeat.estimate(&[scalar("ab"), int(600_000_000)], 1).unwrap(), 1_200_000_000);
        assert_eq!(Growth::Repeat.estimate(&[scalar("ab"), int(-5)], 1).unwrap(), 0);
        assert_eq!(Growth::Pad.estimate(&[scalar("x"), int(10)], 3).unwrap(), 120);
        // "aaaa".replace("", "XY") = "XYaXYaXYaXYaXY": 4 + 5 × 2 bytes.
        assert!(Growth::Replace.estimate(&[scalar("aaaa"), scalar(""), scalar("XY")], 1).unwrap() >= "aaaa".replace("", "XY").len() as u128);
        assert!(Growth::Replace.estimate(&[scalar("abab"), scalar("ab"), scalar("xyz")], 1).unwrap() >= 6);
        assert!(Growth::RegexpReplace.estimate(&[scalar("aaa"), scalar("a*"), scalar("$0$0")], 1).unwrap() >= 12);
        assert_eq!(Growth::SumOfArguments.estimate(&[scalar("ab"), scalar("cd")], 1).unwrap(), 4 + 2 * 2);
    }

    #[test]
    fn every_known_builder_is_wrapped() {
        let builders = Builders::of_default_context();
        let names = builders.names();
        for name in ["repeat", "lpad", "rpad", "replace", "regexp_replace", "translate", "concat", "concat_ws", "overlay", "encode", "array_to_string"] {
            assert!(names.contains(&name), "{name} is not among the wrapped functions {names:?}");
        }
    }
}
