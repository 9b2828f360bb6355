//! Tenants' SQL as the query service's gate receives it, on a thread with the stack the gate
//! asks for (as the service's workers give it). No panic and no stack overflow; and what it
//! accepts is, parsed again, one query statement whose relations (found by sqlparser's own
//! `visit_relations`, not the gate's walk) are `events` and the query's own CTEs only.
#![no_main]

use std::ops::ControlFlow;
use std::sync::{mpsc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use sqlparser::ast::{visit_relations, Statement};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

type Job = (String, mpsc::SyncSender<Result<String, tally_sql_gate::Error>>);

/// One thread with the gate's stack, kept for the whole run (a thread per input would cost more
/// than the gate). A panic on it ends the run: the next send or receive fails.
fn gate() -> &'static Mutex<mpsc::Sender<Job>> {
    static GATE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    GATE.get_or_init(|| {
        let (jobs, queued) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .stack_size(tally_sql_gate::REQUIRED_STACK_BYTES)
            .spawn(move || {
                for (sql, answer) in queued {
                    let checked = tally_sql_gate::check_read_only(&sql, 1 << 16).map(|()| sql);
                    answer.send(checked).expect("the fuzzer waits for the answer");
                }
            })
            .expect("a thread");
        Mutex::new(jobs)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let (answer, answered) = mpsc::sync_channel(1);
    gate().lock().expect("one fuzzing thread").send((sql.to_string(), answer)).expect("the gate thread runs");
    let Ok(sql) = answered.recv().expect("the gate does not panic") else { return };
    let statements =
        Parser::new(&GenericDialect {}).with_recursion_limit(64).try_with_sql(&sql).and_then(|mut p| p.parse_statements()).expect("accepted SQL parses");
    let [statement @ Statement::Query(_)] = &statements[..] else { panic!("accepted something other than one query: {statements:?}") };
    let ctes = tally_sql_gate::cte_names(statement);
    let _ = visit_relations(statement, |name| {
        let single = match &name.0[..] {
            [part] => part.as_ident().map(|i| i.value.to_lowercase()),
            _ => None,
        };
        assert!(single.is_some_and(|n| n == tally_sql_gate::EVENTS_TABLE || ctes.contains(&n)), "accepted a read of {name}");
        ControlFlow::<()>::Continue(())
    });
});
