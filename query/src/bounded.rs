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
//! allocated. No single value may be larger than [`MAX_BUILT_VALUE_BYTES`] either: the largest
//! value an event can carry, so that a join or a wide select copying built values into its output
//! batches amplifies them no more than it amplifies stored ones.
//!
//! Invariant: the estimate is never below what the function can return for those arguments.
//! Functions whose output cannot be bounded cheaply from their arguments (`levenshtein`,
//! `array_repeat`, `range`, …) are refused by the SQL gate instead (see the `tally-sql-gate` crate).

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::logical_expr::{ColumnarValue, LogicalPlan, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature};
use datafusion::prelude::SessionContext;

/// Largest value one function call may build for one row: the size of the largest value an event
/// can carry (61,440 bytes) rounded up. With it, a built value is never larger than what the data
/// itself can hold, so joins and wide selects amplify built values no more than stored ones.
pub const MAX_BUILT_VALUE_BYTES: u128 = 64 * 1024;

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
    /// `concat`, `concat_ws`, `overlay`, and the constructors of lists, structs and maps
    /// (`make_array`, `array_concat`, `array_append`, `struct`, `map`, …): the arguments, plus a
    /// separator (the first argument, for `concat_ws`) per argument.
    SumOfArguments,
    /// `encode(s, format)`: hex doubles, base64 adds a third.
    Encode,
    /// `array_to_string(list, sep [, null])`: each innermost element's text (at most 24 bytes
    /// for a number) plus a separator and the null text, at every level of nesting.
    ListToString,
    /// `array_replace[_n|_all](list, from, to)`: every innermost element may become `to`.
    ListReplace,
}

impl Growth {
    fn of(name: &str) -> Option<Growth> {
        Some(match name {
            "repeat" => Growth::Repeat,
            "lpad" | "rpad" => Growth::Pad,
            "replace" => Growth::Replace,
            "regexp_replace" => Growth::RegexpReplace,
            "translate" => Growth::Translate,
            "concat" | "concat_ws" | "overlay" | "make_array" | "array_concat" | "array_append" | "array_prepend" | "struct" | "named_struct" | "map" => {
                Growth::SumOfArguments
            }
            "encode" => Growth::Encode,
            "array_to_string" => Growth::ListToString,
            "array_replace" | "array_replace_n" | "array_replace_all" => Growth::ListReplace,
            _ => return None,
        })
    }

    /// An upper bound of the bytes the function returns for `args` over `rows` rows, or an error
    /// when one row's value would be over [`MAX_BUILT_VALUE_BYTES`].
    fn estimate(self, name: &str, args: &[ColumnarValue], rows: usize) -> Result<u128> {
        // A scalar stays one row (never `rows` copies of it); `row` maps every row to it.
        // Dictionaries are unpacked once, so their values are measured like any other.
        let args: Vec<ArrayRef> = args
            .iter()
            .map(|a| {
                let array = match a {
                    ColumnarValue::Array(array) => Arc::clone(array),
                    ColumnarValue::Scalar(value) => value.to_array()?,
                };
                match array.data_type() {
                    DataType::Dictionary(_, values) => Ok(cast(&array, values)?),
                    _ => Ok(array),
                }
            })
            .collect::<Result<_>>()?;
        let len = |a: usize, i: usize| args.get(a).map_or(0, |arr| value_bytes(arr, row(arr.len(), i)));
        let counts = match self {
            Growth::Repeat | Growth::Pad => args.get(1).map(|c| cast(c, &DataType::Int64)).transpose()?,
            _ => None,
        };
        let count = |i: usize| -> u128 {
            counts.as_ref().map_or(0, |c| {
                let c = c.as_primitive::<Int64Type>();
                let r = row(c.len(), i);
                if r >= c.len() || c.is_null(r) {
                    0
                } else {
                    c.value(r).max(0) as u128
                }
            })
        };
        let mut total: u128 = 0;
        for i in 0..rows {
            let one = match self {
                Growth::Repeat => len(0, i) * count(i),
                Growth::Pad => count(i) * 4,
                Growth::Replace => {
                    let (s, from, to) = (len(0, i), len(1, i), len(2, i));
                    let places = s.checked_div(from).map_or(s + 1, |n| n + 1);
                    s + places * to
                }
                // Empty matches can occur at every position; a group reference copies at most
                // the match, and matches do not overlap.
                Growth::RegexpReplace => len(0, i) + 2 * (len(0, i) + 1) * (len(2, i) + 1),
                Growth::Translate => 4 * len(0, i),
                Growth::Encode => 2 * len(0, i) + 4,
                Growth::SumOfArguments => (0..args.len()).map(|a| len(a, i)).sum::<u128>() + len(0, i) * args.len() as u128,
                Growth::ListToString => {
                    let leaves = args.first().map_or(0, |list| leaves(list, row(list.len(), i)));
                    len(0, i) + leaves * (24 + len(1, i) + len(2, i))
                }
                Growth::ListReplace => {
                    let leaves = args.first().map_or(0, |list| leaves(list, row(list.len(), i)));
                    len(0, i) + leaves * len(2, i)
                }
            };
            if one > MAX_BUILT_VALUE_BYTES {
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "{name}() would build a value of up to {one} bytes; one value may be at most {MAX_BUILT_VALUE_BYTES}"
                )));
            }
            total += one;
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

/// An upper bound of the bytes of row `i` of `array`: text and binary values by their length,
/// lists and structs by their children, fixed-width values by their width (0 for nulls).
fn value_bytes(array: &ArrayRef, i: usize) -> u128 {
    if i >= array.len() || array.is_null(i) {
        return 0;
    }
    let slice = |values: &ArrayRef, from: usize, to: usize| (from..to).map(|j| value_bytes(values, j)).sum::<u128>();
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(i).len() as u128,
        DataType::LargeUtf8 => array.as_string::<i64>().value(i).len() as u128,
        DataType::Utf8View => array.as_string_view().value(i).len() as u128,
        DataType::Binary => array.as_binary::<i32>().value(i).len() as u128,
        DataType::LargeBinary => array.as_binary::<i64>().value(i).len() as u128,
        DataType::BinaryView => array.as_binary_view().value(i).len() as u128,
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let offsets = list.value_offsets();
            8 + slice(list.values(), offsets[i] as usize, offsets[i + 1] as usize)
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            let offsets = list.value_offsets();
            8 + slice(list.values(), offsets[i] as usize, offsets[i + 1] as usize)
        }
        DataType::Map(..) => {
            let map = array.as_map();
            let offsets = map.value_offsets();
            let entries: ArrayRef = Arc::new(map.entries().clone());
            8 + slice(&entries, offsets[i] as usize, offsets[i + 1] as usize)
        }
        DataType::FixedSizeList(_, n) => {
            let (list, n) = (array.as_fixed_size_list(), *n as usize);
            8 + slice(list.values(), i * n, (i + 1) * n)
        }
        DataType::Struct(_) => array.as_struct().columns().iter().map(|c| value_bytes(c, i)).sum(),
        // Other nested or variable-width types (list views, unions, …): their whole buffers,
        // an upper bound of any one row.
        other if other.is_nested() || other.primitive_width().is_none() => array.get_array_memory_size() as u128,
        other => other.primitive_width().unwrap_or(16) as u128,
    }
}

/// The innermost elements of row `i` of `array`, nulls included (1 for a value that is not a
/// list): `array_to_string` writes a separator between all of them, at every level.
fn leaves(array: &ArrayRef, i: usize) -> u128 {
    if i >= array.len() || array.is_null(i) {
        return 1;
    }
    let slice = |values: &ArrayRef, from: usize, to: usize| (from..to).map(|j| leaves(values, j)).sum::<u128>();
    match array.data_type() {
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let offsets = list.value_offsets();
            slice(list.values(), offsets[i] as usize, offsets[i + 1] as usize)
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            let offsets = list.value_offsets();
            slice(list.values(), offsets[i] as usize, offsets[i + 1] as usize)
        }
        DataType::FixedSizeList(_, n) => {
            let (list, n) = (array.as_fixed_size_list(), *n as usize);
            slice(list.values(), i * n, (i + 1) * n)
        }
        _ => 1,
    }
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
        let bytes = self.growth.estimate(self.inner.name(), &args.args, args.number_rows)?;
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

    /// `plan` with every value-building function bounded: SQL syntax such as `[a, b]`,
    /// `MAP {…}` or `OVERLAY(… PLACING …)` is planned with DataFusion's own functions, not the
    /// ones registered in `ctx`, so they are swapped for `ctx`'s here, before optimization (and
    /// so before constant folding runs any of them).
    pub fn bound_plan(ctx: &SessionContext, plan: LogicalPlan) -> Result<LogicalPlan> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::logical_expr::expr::ScalarFunction;
        use datafusion::logical_expr::Expr;
        let state = ctx.state();
        let registered = state.scalar_functions();
        plan.transform_up_with_subqueries(|node| {
            node.map_expressions(|expr| {
                expr.transform_up(|e| match e {
                    Expr::ScalarFunction(f) if Growth::of(f.func.name()).is_some() && !f.func.inner().is::<Bounded>() => {
                        let bounded = registered
                            .get(f.func.name())
                            .filter(|g| g.inner().is::<Bounded>())
                            .ok_or_else(|| DataFusionError::Plan(format!("{}() is not available here", f.func.name())))?;
                        Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction { func: Arc::clone(bounded), args: f.args })))
                    }
                    other => Ok(Transformed::no(other)),
                })
            })
        })
        .map(|t| t.data)
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

    fn estimate(growth: Growth, args: &[ColumnarValue], rows: usize) -> Result<u128> {
        growth.estimate("f", args, rows)
    }

    #[test]
    fn estimates_bound_the_output() {
        assert_eq!(estimate(Growth::Repeat, &[scalar("ab"), int(30_000)], 1).unwrap(), 60_000);
        assert_eq!(estimate(Growth::Repeat, &[scalar("ab"), int(-5)], 1).unwrap(), 0);
        assert_eq!(estimate(Growth::Pad, &[scalar("x"), int(10)], 3).unwrap(), 120);
        // "aaaa".replace("", "XY") = "XYaXYaXYaXYaXY": 4 + 5 × 2 bytes.
        assert!(estimate(Growth::Replace, &[scalar("aaaa"), scalar(""), scalar("XY")], 1).unwrap() >= "aaaa".replace("", "XY").len() as u128);
        assert!(estimate(Growth::Replace, &[scalar("abab"), scalar("ab"), scalar("xyz")], 1).unwrap() >= 6);
        assert!(estimate(Growth::RegexpReplace, &[scalar("aaa"), scalar("a*"), scalar("$0$0")], 1).unwrap() >= 12);
        assert_eq!(estimate(Growth::SumOfArguments, &[scalar("ab"), scalar("cd")], 1).unwrap(), 4 + 2 * 2);
        let list = ColumnarValue::Scalar(ScalarValue::List(
            datafusion::common::utils::SingleRowListArrayBuilder::new(Arc::new(datafusion::arrow::array::StringArray::from(vec!["abc"; 10])))
                .build_list_array()
                .into(),
        ));
        assert!(estimate(Growth::ListToString, &[list.clone(), scalar(",")], 1).unwrap() >= 10 * 4);
        assert!(estimate(Growth::SumOfArguments, &[list.clone(), list], 1).unwrap() >= 2 * 30);
    }

    #[test]
    fn one_value_over_the_bound_is_refused_before_it_is_built() {
        let err = estimate(Growth::Repeat, &[scalar("x"), int(600_000_000)], 1).unwrap_err();
        assert!(matches!(err, DataFusionError::ResourcesExhausted(_)), "{err}");
        assert!(estimate(Growth::Repeat, &[scalar("x"), int(MAX_BUILT_VALUE_BYTES as i64)], 1).is_ok());
        assert!(estimate(Growth::Pad, &[scalar("x"), int(100_000)], 1).is_err());
    }

    #[test]
    fn every_known_builder_is_wrapped() {
        let builders = Builders::of_default_context();
        let names = builders.names();
        for name in [
            "repeat",
            "lpad",
            "rpad",
            "replace",
            "regexp_replace",
            "translate",
            "concat",
            "concat_ws",
            "overlay",
            "encode",
            "array_to_string",
            "make_array",
            "array_concat",
            "array_append",
            "struct",
            "map",
            "array_replace_all",
        ] {
            assert!(names.contains(&name), "{name} is not among the wrapped functions {names:?}");
        }
    }
}
