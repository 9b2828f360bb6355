//! The read-only SQL gate for `POST /v1/tenants/{t}/sql`, checked before DataFusion sees a query.
//!
//! Isolation does not rest on this gate alone: each request's DataFusion context holds one table,
//! `events`, over the calling tenant's files only, with no information schema, no URL tables and
//! DDL/DML/statements refused by DataFusion's own `SQLOptions`. The gate makes refusals early and
//! clear: exactly one `SELECT`/`WITH` query; every table it reads is `events` or one of its own
//! CTEs; no table functions (`read_parquet`, `generate_series`, …) or other table factors that do
//! not read rows of `events`.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{ObjectName, Query, Statement, TableFactor, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::error::{Error, Result};

/// The only table a tenant's SQL can name.
pub const EVENTS_TABLE: &str = "events";

/// Nesting depth the parser accepts (deeper queries are refused, not a stack overflow).
const RECURSION_LIMIT: usize = 64;

/// Checks `sql` against the gate; returns the single statement's text to run.
pub fn check_read_only(sql: &str, max_bytes: usize) -> Result<()> {
    if sql.len() > max_bytes {
        return Err(Error::SqlRejected(format!("the query is {} bytes; at most {max_bytes} are accepted", sql.len())));
    }
    let statements = Parser::new(&GenericDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| Error::SqlRejected(format!("cannot parse: {e}")))?;
    let [statement] = &statements[..] else {
        return Err(Error::SqlRejected(format!("exactly one statement is accepted, found {}", statements.len())));
    };
    let Statement::Query(_) = statement else {
        return Err(Error::SqlRejected("only read-only queries (SELECT or WITH … SELECT) are accepted".into()));
    };
    let mut ctes = CteNames::default();
    let _ = statement.visit(&mut ctes);
    let mut gate = Gate { ctes: ctes.0 };
    match statement.visit(&mut gate) {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
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
}

impl Visitor for Gate {
    type Break = Error;

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Error> {
        let name = match &relation.0[..] {
            [part] => part.as_ident().map(|i| i.value.to_lowercase()),
            _ => None,
        };
        match name {
            Some(n) if n == EVENTS_TABLE || self.ctes.contains(&n) => ControlFlow::Continue(()),
            _ => ControlFlow::Break(Error::SqlRejected(format!("only the table `{EVENTS_TABLE}` (and the query's own CTEs) can be read, not `{relation}`"))),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Error> {
        match factor {
            TableFactor::Table { args: Some(_), name, .. } => {
                ControlFlow::Break(Error::SqlRejected(format!("table functions are not available: `{name}`")))
            }
            TableFactor::Table { .. } | TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } | TableFactor::UNNEST { .. } => ControlFlow::Continue(()),
            other => ControlFlow::Break(Error::SqlRejected(format!("this kind of FROM item is not available: `{other}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let err = check_read_only(sql, 1 << 16).unwrap_err();
            assert_eq!(err.code(), "sql_rejected", "{sql}: {err}");
        }
        let deep = format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500));
        assert_eq!(check_read_only(&deep, 1 << 16).unwrap_err().code(), "sql_rejected");
        assert_eq!(check_read_only("SELECT 1", 3).unwrap_err().code(), "sql_rejected");
    }
}
