//! What both services measure and log at their HTTP edge, and the registry their own metrics
//! join.
//!
//! [`Telemetry`] is one Prometheus registry per service instance (never the process-global one:
//! tests and embedders run several services in one process). [`Telemetry::instrument`] puts two
//! layers in front of a router: a latency histogram per route template, method and status
//! (`tally_<service>_http_request_duration_seconds`), and `tower-http`'s `TraceLayer`, which gives
//! every request a span and logs its response. Labels are bounded by construction: the route is
//! axum's matched template (`/v1/tenants/{tenant}/events`, never a tenant id) or `unmatched`, the
//! method is one of the standard ones or `other`, and the status is a number. An error response
//! that carries its stable code as an [`ErrorCode`] extension is also counted by route and code
//! (`tally_<service>_http_errors_total`), so `429 too_many_queries` and `503 rebalancing` are
//! told apart. No metric of either service carries a tenant id.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use prometheus::core::Collector;
use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// Latency buckets from 100 µs to about 40 s, ×2.5 apart: fsyncs and admissions at the low end,
/// queries and exports at the high end.
pub fn latency_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.0001 * 2.5f64.powi(i)).collect()
}

/// The stable error code of an error response, put in its extensions by the service's error
/// type, so the request layer can count errors by code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// One service instance's metrics registry and its HTTP request metrics.
#[derive(Clone)]
pub struct Telemetry {
    registry: Registry,
    http: HttpMetrics,
    token_reload_failures: IntCounter,
}

#[derive(Clone)]
struct HttpMetrics {
    requests: HistogramVec,
    errors: IntCounterVec,
}

// Registration fails only for an invalid or repeated metric name: the names are constants of
// this code base, and `every_metric_renders` registers each of them.
const UNIQUE: &str = "metric names are unique, valid constants";

impl Telemetry {
    /// A fresh registry for `service` (`ledger` or `query`: the metric name prefix), with the
    /// metrics every service has: its HTTP requests and errors, and token-file reload failures.
    pub fn new(service: &str) -> Telemetry {
        let t = Telemetry {
            registry: Registry::new(),
            http: HttpMetrics {
                requests: HistogramVec::new(
                    HistogramOpts::new(
                        format!("tally_{service}_http_request_duration_seconds"),
                        "Time to answer an HTTP request (to its response headers), by route template, method and status.",
                    )
                    .buckets(latency_buckets()),
                    &["route", "method", "status"],
                )
                .expect(UNIQUE),
                errors: IntCounterVec::new(
                    Opts::new(format!("tally_{service}_http_errors_total"), "Error responses by route template and stable error code."),
                    &["route", "code"],
                )
                .expect(UNIQUE),
            },
            token_reload_failures: IntCounter::new(
                format!("tally_{service}_token_reload_failures_total"),
                "Token file reloads that found it missing or invalid (no token is accepted until it is fixed).",
            )
            .expect(UNIQUE),
        };
        // Clones share their values: registering a clone registers the metric.
        t.register(t.http.requests.clone());
        t.register(t.http.errors.clone());
        t.register(t.token_reload_failures.clone());
        t
    }

    /// Adds `metric` to the registry and hands it back.
    fn register<M: Collector + Clone + 'static>(&self, metric: M) -> M {
        self.registry.register(Box::new(metric.clone())).expect(UNIQUE);
        metric
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect(UNIQUE))
    }

    /// A counter with labels; every label's values must come from a closed set.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect(UNIQUE))
    }

    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.register(Gauge::new(name, help).expect(UNIQUE))
    }

    pub fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect(UNIQUE))
    }

    pub fn int_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect(UNIQUE))
    }

    /// A histogram with [`latency_buckets`].
    pub fn histogram(&self, name: &str, help: &str) -> Histogram {
        self.register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets())).expect(UNIQUE))
    }

    pub fn histogram_vec(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        self.register(HistogramVec::new(HistogramOpts::new(name, help).buckets(latency_buckets()), labels).expect(UNIQUE))
    }

    /// The Prometheus text exposition of everything registered. `token_reload_failures` is the
    /// token store's count (`TokenStore::reload_failures`); the counter is brought up to it.
    pub fn render(&self, token_reload_failures: u64) -> String {
        self.token_reload_failures.inc_by(token_reload_failures.saturating_sub(self.token_reload_failures.get()));
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }

    /// A `/metrics` response: `text` (from [`Telemetry::render`]) as `text/plain; version=0.0.4`.
    pub fn text_response(text: String) -> Response {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
    }

    /// `router` with the request histogram and `TraceLayer` spans and logs on every route (and
    /// the fallback). Apply it after all routes are added.
    pub fn instrument<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        let trace = TraceLayer::new_for_http()
            .make_span_with(|request: &Request| {
                let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
                tracing::info_span!("http", method = %request.method(), route, path = %request.uri().path())
            })
            .on_response(DefaultOnResponse::new().level(tracing::Level::INFO).latency_unit(tower_http::LatencyUnit::Micros));
        router.layer(middleware::from_fn_with_state(self.http.clone(), observe)).layer(trace)
    }
}

async fn observe(State(http): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    http.requests.with_label_values(&[route.as_str(), method, response.status().as_str()]).observe(started.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        http.errors.with_label_values(&[route.as_str(), code]).inc();
    }
    response
}

/// A method as a label: anything but the standard methods is `other`, so a client inventing
/// methods cannot grow the label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn requests_are_counted_by_route_template_never_by_tenant() {
        let t = Telemetry::new("test");
        let refused = || async {
            let mut response = (axum::http::StatusCode::TOO_MANY_REQUESTS, "busy").into_response();
            response.extensions_mut().insert(ErrorCode("too_many_queries"));
            response
        };
        let app = t.instrument(Router::new().route("/v1/tenants/{tenant}/events", get(|| async { "ok" })).route("/v1/tenants/{tenant}/sql", get(refused)));
        for uri in ["/v1/tenants/acme/events", "/v1/tenants/globex/events", "/nowhere/secret-tenant", "/v1/tenants/acme/sql"] {
            app.clone().oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        }
        let made_up = axum::http::Request::builder().method("BREW").uri("/v1/tenants/acme/events").body(Body::empty()).unwrap();
        app.clone().oneshot(made_up).await.unwrap();
        let text = t.render(0);
        assert!(text.contains(r#"tally_test_http_request_duration_seconds_count{method="GET",route="/v1/tenants/{tenant}/events",status="200"} 2"#), "{text}");
        assert!(text.contains(r#"tally_test_http_request_duration_seconds_count{method="GET",route="unmatched",status="404"} 1"#), "{text}");
        assert!(text.contains(r#"method="other""#), "{text}");
        assert!(text.contains(r#"tally_test_http_errors_total{code="too_many_queries",route="/v1/tenants/{tenant}/sql"} 1"#), "{text}");
        for secret in ["acme", "globex", "secret-tenant", "BREW"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    #[test]
    fn every_kind_of_metric_renders_in_its_own_registry() {
        let a = Telemetry::new("a");
        let b = Telemetry::new("a");
        a.counter("tally_a_things_total", "Things.").inc_by(3);
        a.counter_vec("tally_a_dead_total", "Dead.", &["reason"]).with_label_values(&["bad_json"]).inc();
        a.gauge("tally_a_lag_seconds", "Lag.").set(1.5);
        a.int_gauge("tally_a_partitions", "Partitions.").set(4);
        a.int_gauge_vec("tally_a_consumer_lag", "Lag.", &["partition"]).with_label_values(&["0"]).set(7);
        a.histogram("tally_a_commit_seconds", "Commit.").observe(0.002);
        a.histogram_vec("tally_a_fsync_seconds", "Fsync.", &["what"]).with_label_values(&["logs"]).observe(0.0002);
        let text = a.render(2);
        for line in [
            "tally_a_things_total 3",
            r#"tally_a_dead_total{reason="bad_json"} 1"#,
            "tally_a_lag_seconds 1.5",
            "tally_a_partitions 4",
            r#"tally_a_consumer_lag{partition="0"} 7"#,
            "tally_a_commit_seconds_count 1",
            r#"tally_a_fsync_seconds_bucket{what="logs",le="0.00025"} 1"#,
            "tally_a_token_reload_failures_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from {text}");
        }
        assert!(!b.render(0).contains("tally_a_things_total"), "registries are per instance");
    }
}
