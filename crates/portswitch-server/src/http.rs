//! HTTP endpoint: Prometheus metrics at `/metrics`, liveness and a summary at `/health`,
//! and a group member's view of its group at `/cluster`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::state::Shared;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/cluster", get(cluster))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let s = shared.snapshot();
    let body = format!(
        "{{\"status\":\"ok\",\"epoch\":{},\"sessions\":{},\"ports_owned\":{},\"connections\":{}}}\n",
        s.core.epoch, s.core.sessions, s.core.ports_owned, s.connections
    );
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn cluster(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let body = match shared.cluster_status() {
        Some(s) => serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        None => "{\"standalone\":true}".to_string(),
    };
    ([(header::CONTENT_TYPE, "application/json")], body + "\n")
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let snap = shared.snapshot();
    let mut reg = Registry::with_prefix("portswitch");
    for (name, value) in snap.pairs() {
        let help = help_for(name);
        if let Some(base) = name.strip_suffix("_total") {
            let c: Counter = Counter::default();
            c.inc_by(value);
            reg.register(base, help, c);
        } else {
            let g: Gauge = Gauge::default();
            g.set(value.min(i64::MAX as u64) as i64);
            reg.register(name, help, g);
        }
    }
    let mut body = String::new();
    if encode(&mut body, &reg).is_err() {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        );
    }
    (
        axum::http::StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

fn help_for(name: &str) -> &'static str {
    match name {
        "epoch" => "Epoch this server serves in (high half of fencing tokens)",
        "sessions" => "Sessions held, attached or awaiting resume",
        "sessions_attached" => "Sessions with a live connection",
        "ports_owned" => "Ports with an owner",
        "port_entries" => "Ports with an owner, waiter or watcher",
        "waiters" => "Sessions queued for ports",
        "watches" => "Port and prefix watches",
        "prefix_watches" => "Prefix watches",
        "requests_total" => "Requests handled by the core",
        "registers_total" => "REGISTER requests",
        "grants_total" => "Ports granted (each with a new fencing token)",
        "releases_total" => "Ports released",
        "messages_relayed_total" => "MESSAGE events relayed by SEND and BROADCAST",
        "sessions_created_total" => "Sessions created",
        "sessions_expired_total" => "Sessions ended by lease expiry",
        "sessions_resumed_total" => "Sessions resumed on a new connection",
        "errors_total" => "Requests answered with an error",
        "table_heap_bytes" => "Heap bytes of the port table's arrays",
        "recovering" => "1 while this master's recovery window is open",
        "sessions_adopted_total" => "Sessions of an earlier master adopted in the recovery window",
        "ports_reclaimed_total" => "Ports taken back with RECLAIM in the recovery window",
        "watch_filters" => "Prefix watches with a filter expression",
        "filter_errors_total" => {
            "Filter evaluations that failed (that port left out of its LIST page, that event not delivered)"
        }
        "connections" => "Open client connections",
        "connections_total" => "Client connections accepted",
        "connections_rejected_total" => "Connections refused at connections_max",
        "hellos_throttled_total" => "HELLOs answered overloaded (hello_rate_max)",
        "slow_consumer_disconnects_total" => "Connections closed for not reading their output",
        "malformed_disconnects_total" => "Connections closed for malformed frames",
        "login_timeouts_total" => "Connections closed for having no session within login_timeout_ms",
        "stalls_total" => "Server stalls longer than the stall threshold (not charged to leases)",
        "stalled_ms" => "Milliseconds of server stalls not charged to leases",
        "feed_lock_ns_total" => {
            "Nanoseconds spent handling frames under the state lock (one core's worth at most)"
        }
        "rss_bytes" => "Resident memory of the server process",
        "uptime_ms" => "Milliseconds since start",
        "role" => "0 standalone, 1 follower, 2 taking over as master, 3 master",
        "node_id" => "This member's id in its group (0 standalone)",
        "master_lease_left_ms" => "Milliseconds left of the master lease (0 unless master)",
        "lease_ceiling_ms" => "Longest client lease this master may grant before raising it durably, through the group or in its data directory (0 without either)",
        "recovery_left_ms" => "Milliseconds left of the recovery window (0 when none is open)",
        _ => "",
    }
}
