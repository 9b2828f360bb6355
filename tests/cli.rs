//! The `tally` binary end to end against the real broker, as the README's main job runs it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn tally(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally")).args(args).env("KAFKA_BOOTSTRAP", kafka().bootstrap).env("RUST_LOG", "warn").output().expect("run tally")
}

fn example_lines(sub: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/examples").join(sub);
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .map(|p| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap())
        .filter(|v| v.get("tenant_id").is_some_and(|t| t.is_string()))
        .map(|v| v.to_string())
        .collect()
}

#[test]
fn publish_then_consume_routes_examples_to_tenants_and_the_dlq() {
    let topic = unique_topic("cli");
    let out = tally(&["topics", "--events-topic", &topic, "--partitions", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let valid = example_lines("valid");
    let invalid = example_lines("invalid");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let mut text = [valid.clone(), invalid.clone()].concat().join("\n");
    text.push('\n');
    std::fs::write(&file, text).unwrap();

    let out = tally(&["publish", "--topic", &topic, file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let total = valid.len() + invalid.len();
    assert!(stdout.contains(&format!("{total} sent, 0 failed")), "{stdout}");
    assert!(stdout.contains("  acme: "), "per-tenant counts: {stdout}");

    let group = format!("{topic}.g");
    let out = tally(&["consume", "--topic", &topic, "--group", &group, "--idle-exit", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let summary = format!("{} accepted for", valid.len());
    assert!(stdout.contains(&summary), "{stdout}");
    assert!(stdout.contains(&format!("{} dead-lettered", invalid.len())), "{stdout}");
    assert!(stdout.contains("dlq negative_cost: 1"), "{stdout}");

    // The group committed its progress: a second run sees nothing new.
    let out = tally(&["consume", "--topic", &topic, "--group", &group, "--idle-exit", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 accepted for 0 tenants, 0 dead-lettered"), "{stdout}");
}

#[test]
fn publish_reports_lines_it_cannot_key_and_fails() {
    let topic = unique_topic("cli-bad");
    assert!(tally(&["topics", "--events-topic", &topic, "--partitions", "1"]).status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, "{\"tenant_id\":\"acme\",\"event_id\":\"x\"}\nnot json\n[1,2]\n").unwrap();
    let out = tally(&["publish", "--topic", &topic, file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 2: not sent: not JSON"), "{stderr}");
    assert!(stderr.contains("line 3: not sent"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 sent, 2 failed"), "{stdout}{stderr}");
}

#[test]
fn bad_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tally.toml");
    std::fs::write(&cfg, "[kafka]\nbootstrapp = \"127.0.0.1:9092\"\n").unwrap();
    let out = tally(&["--config", cfg.to_str().unwrap(), "topics"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bootstrapp"), "{stderr}");
}

/// `tally query` with its stderr in a file, as a service manager runs it: `--log-format json`
/// gives one JSON object per line, with the request span (method, route) on the request's
/// line; the text format has no colour codes when stderr is not a terminal.
#[test]
fn service_logs_are_json_on_request_and_never_coloured_off_a_terminal() {
    for format in ["json", "text"] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("query.toml");
        std::fs::write(&config, format!("[query]\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\n", dir.path().join("data"))).unwrap();
        let log_path = dir.path().join("query.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["--config", config.to_str().unwrap(), "--log-format", format, "query"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let wait_for = |what: &dyn Fn(&str) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !what(&log()) {
                assert!(std::time::Instant::now() < deadline, "{format}: gave up waiting; log so far:\n{}", log());
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        };
        wait_for(&|l| l.contains("query service listening"));
        let text = log();
        let at = text.find("127.0.0.1:").unwrap() + "127.0.0.1:".len();
        let port: u16 = text[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut stream, b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
        assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"), "{response}");
        wait_for(&|l| l.contains("/healthz"));
        let _ = child.kill();
        let _ = child.wait();
        let text = log();
        assert!(!text.contains('\u{1b}'), "{format}: colour codes in a file:\n{text}");
        if format == "json" {
            let lines: Vec<serde_json::Value> =
                text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}"))).collect();
            let request = lines.iter().find(|l| l["span"]["route"] == "/healthz").unwrap_or_else(|| panic!("no request line with its span:\n{text}"));
            assert_eq!(request["span"]["method"], "GET", "{request}");
            assert!(request["fields"]["status"] == 200, "{request}");
        } else {
            assert!(text.lines().any(|l| l.contains(r#"route="/healthz""#) && l.contains("status=200")), "{text}");
        }
    }
}
