//! Prometheus metrics of a tunnel endpoint, and the HTTP endpoint that serves them.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Every counter of one endpoint (server or client). Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Carried bytes: read from user sockets and sent into the tunnel.
    pub carried_sent_bytes: Counter,
    /// Carried bytes: received from the tunnel and written to user sockets.
    pub carried_received_bytes: Counter,
    /// Bytes written to pool connections (records and hellos).
    pub wire_sent_bytes: Counter,
    /// Bytes read from pool connections.
    pub wire_received_bytes: Counter,
    pub records_sent: Counter,
    pub records_received: Counter,
    pub chunks_compressed: Counter,
    pub chunks_plain: Counter,
    pub frames_retransmitted: Counter,
    pub streams_opened: Counter,
    pub streams_failed: Counter,
    pub pool_connections_dialled: Counter,
    pub pool_connections_lost: Counter,
    pub handshakes: Family<ResultLabel, Counter>,
    /// Client: moves to another server, by why (`released`: its port left the port
    /// switch; `unreachable`: dials kept failing with nothing up).
    pub server_moves: Family<ResultLabel, Counter>,
    /// Server: registrations of its port in the port switch (the first, and each one
    /// after its port-switch session or port was lost).
    pub switch_registrations: Counter,
    pub streams_open: Gauge,
    pub pool_connections: Gauge,
    pub sessions: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn handshake(&self, result: &str) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn server_moved(&self, why: &str) {
        self.server_moves
            .get_or_create(&ResultLabel {
                result: why.to_string(),
            })
            .inc();
    }

    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("portswitch_tunnel");
        let m = self.clone();
        r.register(
            "carried_sent_bytes",
            "Carried bytes read from user sockets and sent into the tunnel",
            m.carried_sent_bytes,
        );
        r.register(
            "carried_received_bytes",
            "Carried bytes received from the tunnel and written to user sockets",
            m.carried_received_bytes,
        );
        r.register(
            "wire_sent_bytes",
            "Bytes written to pool connections",
            m.wire_sent_bytes,
        );
        r.register(
            "wire_received_bytes",
            "Bytes read from pool connections",
            m.wire_received_bytes,
        );
        r.register("records_sent", "Records sent", m.records_sent);
        r.register("records_received", "Records received", m.records_received);
        r.register(
            "chunks_compressed",
            "Chunks sent compressed",
            m.chunks_compressed,
        );
        r.register("chunks_plain", "Chunks sent uncompressed", m.chunks_plain);
        r.register(
            "frames_retransmitted",
            "Frames resent after their pool connection died",
            m.frames_retransmitted,
        );
        r.register("streams_opened", "Streams opened", m.streams_opened);
        r.register(
            "streams_failed",
            "Streams whose target could not be reached",
            m.streams_failed,
        );
        r.register(
            "pool_connections_dialled",
            "Pool connections established",
            m.pool_connections_dialled,
        );
        r.register(
            "pool_connections_lost",
            "Pool connections lost",
            m.pool_connections_lost,
        );
        r.register("handshakes", "Handshakes by result", m.handshakes);
        r.register(
            "server_moves",
            "Moves of the client to another server, by reason",
            m.server_moves,
        );
        r.register(
            "switch_registrations",
            "Registrations of the server's port in the port switch",
            m.switch_registrations,
        );
        r.register("streams_open", "Streams open now", m.streams_open);
        r.register(
            "pool_connections",
            "Pool connections up now",
            m.pool_connections,
        );
        r.register("sessions", "Sessions now", m.sessions);
        r
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// Serves `/metrics` and `/health` on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    let metrics = Arc::new(metrics);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok\n" }));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok(bound)
}
