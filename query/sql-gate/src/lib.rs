//! The read-only SQL gate for the query service's `POST /v1/tenants/{t}/sql`, checked before
//! DataFusion sees a query. A crate of its own, on DataFusion's parser (`sqlparser`, same version
//! and features) and nothing else, so that it is fuzzed without building DataFusion
//! (`fuzz/fuzz_targets/sql_gate.rs`).
//!
//! Isolation does not rest on this gate alone: each request's DataFusion context holds one table,
//! `events`, over the calling tenant's files only, with no information schema, no URL tables and
//! DDL/DML/statements refused by DataFusion's own `SQLOptions`. The gate makes refusals early and
//! clear: exactly one `SELECT`/`WITH` query; every table it reads is `events` or one of its own
//! CTEs; no table functions (`read_parquet`, `generate_series`, …) or other table factors that do
//! not read rows of `events`.
//!
//! The gate also bounds the *size* of what DataFusion will plan, because planning recurses over
//! expressions: at most [`MAX_TOKENS`] tokens (counted by the tokenizer, which does not recurse,
//! before anything is parsed), expressions at most [`MAX_EXPR_DEPTH`] deep (`1+1+…+1` is a
//! chain as deep as it is long) and at most [`MAX_EXPR_NODES`] expression nodes in all (long `IN`
//! lists, `CASE` and `concat` chains). Run it on a query worker thread
//! ([`crate::workers::WORKER_STACK_BYTES`] of stack): the AST walk itself recurses as deep as the
//! tokens allow. Functions whose output or running time cannot be bounded from their arguments
//! ([`REFUSED_FUNCTIONS`]) and the `||` operator (use `concat`, which is bounded: see
//! `bounded.rs`) are refused.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{BinaryOperator, Expr, ObjectName, Query, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Why the gate refused a query; the message says what to change. The query service answers
/// it as `400 sql_rejected`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Rejected(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stack the gate needs for a query at its bounds, in a debug build (tested); a release build
/// needs less.
pub const REQUIRED_STACK_BYTES: usize = 16 << 20;

/// The only table a tenant's SQL can name.
pub const EVENTS_TABLE: &str = "events";

/// Nesting depth the parser accepts (deeper queries are refused, not a stack overflow).
const RECURSION_LIMIT: usize = 64;

/// Most tokens (words, literals, operators) a query may have.
pub const MAX_TOKENS: usize = 8_192;

/// Deepest expression tree accepted.
pub const MAX_EXPR_DEPTH: usize = 128;

/// Most expression nodes a query may hold.
pub const MAX_EXPR_NODES: usize = 2_048;

/// Functions that build values or burn time out of proportion to their arguments
/// (`levenshtein` is quadratic; the others build arrays of any length from two numbers).
pub const REFUSED_FUNCTIONS: &[&str] = &["levenshtein", "array_repeat", "list_repeat", "array_resize", "list_resize", "range", "generate_series"];

/// Aggregates that collect their inputs: refused as window functions.
const COLLECTING_AGGREGATES: &[&str] = &["array_agg", "string_agg", "listagg", "list_agg"];

/// Checks `sql` against the gate.
pub fn check_read_only(sql: &str, max_bytes: usize) -> Result<()> {
    if sql.len() > max_bytes {
        return Err(Error::Rejected(format!("the query is {} bytes; at most {max_bytes} are accepted", sql.len())));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize().map_err(|e| Error::Rejected(format!("cannot parse: {e}")))?;
    let counted = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).count();
    if counted > MAX_TOKENS {
        return Err(Error::Rejected(format!("the query has {counted} tokens; at most {MAX_TOKENS} are accepted")));
    }
    drop(tokens);
    let statements = Parser::new(&GenericDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| Error::Rejected(format!("cannot parse: {e}")))?;
    let [statement] = &statements[..] else {
        return Err(Error::Rejected(format!("exactly one statement is accepted, found {}", statements.len())));
    };
    let Statement::Query(_) = statement else {
        return Err(Error::Rejected("only read-only queries (SELECT or WITH … SELECT) are accepted".into()));
    };
    let mut gate = Gate { ctes: cte_names(statement), depth: 0, nodes: 0 };
    match statement.visit(&mut gate) {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The names (lower case) of every CTE `statement` defines, at any depth: the relations besides
/// `events` a query may read.
pub fn cte_names(statement: &Statement) -> BTreeSet<String> {
    let mut ctes = CteNames::default();
    let _ = statement.visit(&mut ctes);
    ctes.0
}

#[derive(Default)]
struct CteNames(BTreeSet<String>);

impl Visitor for CteNames {
    type Break = ();
    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            self.0.extend(with.cte_tables.iter().map(|c| c.alias.name.value.to_lowercase()));
        }
        ControlFlow::Continue(())
    }
}

struct Gate {
    ctes: BTreeSet<String>,
    /// Expressions open on the walk's path, and every expression seen.
    depth: usize,
    nodes: usize,
}

impl Visitor for Gate {
    type Break = Error;

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<Error> {
        self.depth += 1;
        self.nodes += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return ControlFlow::Break(Error::Rejected(format!(
                "an expression is nested more than {MAX_EXPR_DEPTH} deep (a long chain of operators counts as deep)"
            )));
        }
        if self.nodes > MAX_EXPR_NODES {
            return ControlFlow::Break(Error::Rejected(format!("the query has more than {MAX_EXPR_NODES} expressions (long IN lists or CASE chains count)")));
        }
        match expr {
            Expr::BinaryOp { op: BinaryOperator::StringConcat, .. } => {
                ControlFlow::Break(Error::Rejected("the || operator is not available; use concat(a, b, …)".into()))
            }
            Expr::Function(f) => {
                let name = f.name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.to_lowercase()).unwrap_or_default();
                if REFUSED_FUNCTIONS.contains(&name.as_str()) {
                    return ControlFlow::Break(Error::Rejected(format!("the function {name} is not available (its output or running time is unbounded)")));
                }
                // Over a growing frame, each row's aggregate holds every row before it: output
                // quadratic in the rows.
                if f.over.is_some() && COLLECTING_AGGREGATES.contains(&name.as_str()) {
                    return ControlFlow::Break(Error::Rejected(format!(
                        "{name} is not available as a window function (its output grows with the square of the rows); use it with GROUP BY"
                    )));
                }
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Error> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Error> {
        let name = match &relation.0[..] {
            [part] => part.as_ident().map(|i| i.value.to_lowercase()),
            _ => None,
        };
        match name {
            Some(n) if n == EVENTS_TABLE || self.ctes.contains(&n) => ControlFlow::Continue(()),
            _ => ControlFlow::Break(Error::Rejected(format!("only the table `{EVENTS_TABLE}` (and the query's own CTEs) can be read, not `{relation}`"))),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Error> {
        match factor {
            TableFactor::Table { args: Some(_), name, .. } => ControlFlow::Break(Error::Rejected(format!("table functions are not available: `{name}`"))),
            TableFactor::Table { .. } | TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } | TableFactor::UNNEST { .. } => ControlFlow::Continue(()),
            other => ControlFlow::Break(Error::Rejected(format!("this kind of FROM item is not available: `{other}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate on a thread with the stack it asks for.
    fn check_on_required_stack(sql: String) -> Result<()> {
        std::thread::Builder::new().stack_size(REQUIRED_STACK_BYTES).spawn(move || check_read_only(&sql, 1 << 20)).unwrap().join().unwrap()
    }

    #[test]
    fn oversized_expressions_are_refused_with_a_reason() {
        let chain = |n: usize, op: &str| format!("SELECT {}", vec!["1"; n].join(op));
        let cases = [
            (chain(10_000, "+"), "tokens"),
            (chain(300, "+"), "nested more than"),
            (chain(2_000, " AND "), "nested more than"),
            (format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500)), "recursion"),
            (format!("SELECT * FROM events WHERE seq IN ({})", vec!["1"; 3_000].join(",")), "expressions"),
            (format!("SELECT CASE {} END", vec!["WHEN kind = 'a' THEN 1"; 800].join(" ")), "expressions"),
            (format!("SELECT concat({})", vec!["'a'"; 3_000].join(",")), "expressions"),
            (format!("SELECT {}1{}", "(SELECT ".repeat(100), ")".repeat(100)), "recursion"),
            ("SELECT 'a' || 'b'".to_string(), "||"),
            ("SELECT levenshtein(agent_id, action) FROM events".to_string(), "levenshtein"),
            ("SELECT range(1, 1000000000)".to_string(), "range"),
            ("SELECT array_repeat(1, 1000000000)".to_string(), "array_repeat"),
            ("SELECT string_agg(event_id, ',') OVER (ORDER BY seq) FROM events".to_string(), "window"),
            ("SELECT array_agg(event_id) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) FROM events".to_string(), "window"),
        ];
        for (sql, why) in cases {
            let err = check_on_required_stack(sql.clone()).err().unwrap_or_else(|| panic!("accepted: {}", &sql[..sql.len().min(60)]));
            assert!(err.to_string().to_lowercase().contains(why), "{}: {err}", &sql[..sql.len().min(60)]);
        }
        // Within the bounds, long queries pass.
        check_on_required_stack(chain(100, "+")).unwrap();
        check_on_required_stack(format!("SELECT * FROM events WHERE agent_id IN ({})", vec!["'a'"; 1_000].join(","))).unwrap();
    }

    #[test]
    fn plain_queries_and_ctes_pass() {
        for sql in [
            "SELECT count(*) FROM events",
            "select kind, sum(cost_micros) from Events where occurred_at > now() - interval '1 day' group by kind",
            "WITH x AS (SELECT * FROM events) SELECT * FROM x JOIN events e ON x.seq = e.seq",
            "SELECT * FROM (SELECT seq FROM events) t",
            "SELECT 1",
        ] {
            check_read_only(sql, 1 << 16).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[test]
    fn everything_else_is_refused_with_a_reason() {
        for sql in [
            "SELECT * FROM read_parquet('/etc/passwd')",
            "SELECT * FROM '/data/parquet/events/tenant_id=other/x.parquet'",
            "SELECT * FROM information_schema.tables",
            "SELECT * FROM datafusion.public.events",
            "SELECT * FROM generate_series(1, 10)",
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/data'",
            "COPY events TO '/tmp/x.parquet'",
            "INSERT INTO events VALUES (1)",
            "DROP TABLE events",
            "SET datafusion.execution.batch_size = 1",
            "EXPLAIN SELECT * FROM events",
            "SHOW TABLES",
            "SELECT 1; SELECT 2",
            "SELECT * FROM events UNION ALL SELECT * FROM other_tenant",
        ] {
            let Error::Rejected(why) = check_read_only(sql, 1 << 16).unwrap_err();
            assert!(!why.is_empty(), "{sql}");
        }
        let deep = format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500));
        assert!(check_read_only(&deep, 1 << 16).unwrap_err().to_string().contains("recursion"));
        assert!(check_read_only("SELECT 1", 3).unwrap_err().to_string().contains("at most 3"));
    }
}
