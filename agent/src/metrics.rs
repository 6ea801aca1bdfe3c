//! Prometheus metrics, served as text exposition at `/metrics` on the MCP HTTP listener.
//!
//! One process-wide [`Metrics`] ([`global`], a `OnceLock`): the counters are bumped from a
//! single line at each instrumented spot (restarts in `bots.rs`, CNI retries and errors in
//! `network/mod.rs`, evictions in `pool.rs`, snapshot cycles in `versions.rs`), so nothing
//! has to thread a handle through the lifecycle manager. Bots by state is a gauge computed
//! at scrape time from the manager's list and passed to [`Metrics::render`]. Tests render a
//! private [`Metrics`] instead of the global one.
//!
//! Hand-written exposition (format 0.0.4): a few counters and histograms do not need a
//! registry crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::codegen::{http, Service};
use tonic::server::NamedService;

/// Latency buckets of RPCs and tool calls, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of a whole snapshot cycle (stop, commit, prepare, recreate, start), in seconds.
pub const SNAPSHOT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Most label sets a histogram family keeps; later ones are folded into `other`.
const MAX_SERIES: usize = 128;

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram with `bounds` (ascending, `+Inf` implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one sample.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// Histograms keyed by a label set (rendered `k="v",...`).
#[derive(Debug)]
struct Family {
    bounds: &'static [f64],
    series: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
}

impl Family {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn get(&self, labels: &[(&str, &str)]) -> std::sync::Arc<Histogram> {
        let mut key = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        let mut map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) && map.len() >= MAX_SERIES {
            key = labels
                .iter()
                .map(|(k, _)| format!("{k}=\"other\""))
                .collect::<Vec<_>>()
                .join(",");
        }
        map.entry(key)
            .or_insert_with(|| std::sync::Arc::new(Histogram::new(self.bounds)))
            .clone()
    }

    fn write(&self, out: &mut String, name: &str) {
        for (labels, h) in self.series.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            h.write(out, name, labels);
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every metric the agent keeps.
#[derive(Debug)]
pub struct Metrics {
    restarts: AtomicU64,
    cni_retries: AtomicU64,
    cni_errors: AtomicU64,
    lost_states: AtomicU64,
    stale_bundles: AtomicU64,
    evictions: [AtomicU64; 3],
    rpc: Family,
    tools: Family,
    snapshots: Histogram,
}

/// Why the pool dropped a bot's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The bot's route changed (new address or recreated container).
    RouteChanged,
    /// A call failed at the transport level.
    Failure,
    /// The bot was stopped, restarted or deleted.
    Explicit,
}

impl Eviction {
    const ALL: [Eviction; 3] = [Self::RouteChanged, Self::Failure, Self::Explicit];

    fn as_str(self) -> &'static str {
        match self {
            Self::RouteChanged => "route_changed",
            Self::Failure => "failure",
            Self::Explicit => "explicit",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            restarts: AtomicU64::new(0),
            cni_retries: AtomicU64::new(0),
            cni_errors: AtomicU64::new(0),
            lost_states: AtomicU64::new(0),
            stale_bundles: AtomicU64::new(0),
            evictions: Default::default(),
            rpc: Family::new(LATENCY_BUCKETS),
            tools: Family::new(LATENCY_BUCKETS),
            snapshots: Histogram::new(SNAPSHOT_BUCKETS),
        }
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::default)
}

impl Metrics {
    /// A bot's server was restarted after it exited.
    pub fn restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// CNI ADD failed on leftovers and is retried after a DEL.
    pub fn cni_retry(&self) {
        self.cni_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Attaching a bot to the network failed.
    pub fn cni_error(&self) {
        self.cni_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// containerd lost a bot's state mid-commit; recovery put the bot back on an older one.
    pub fn lost_state(&self) {
        self.lost_states.fetch_add(1, Ordering::Relaxed);
    }

    /// A task bundle a killed containerd left half-deleted was removed before a start.
    pub fn stale_bundle_removed(&self) {
        self.stale_bundles.fetch_add(1, Ordering::Relaxed);
    }

    /// The pool dropped a channel.
    pub fn eviction(&self, why: Eviction) {
        self.evictions[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One gRPC call on the control socket (`api` is `control` or `proxy`) took `d`.
    pub fn rpc(&self, api: &str, method: &str, d: Duration) {
        self.rpc.get(&[("api", api), ("method", method)]).observe(d);
    }

    /// One MCP tool call took `d` (`server` is `builtin` or `stdio`).
    pub fn tool_call(&self, server: &str, tool: &str, d: Duration) {
        self.tools
            .get(&[("server", server), ("tool", tool)])
            .observe(d);
    }

    /// A snapshot cycle finished in `d`.
    pub fn snapshot(&self, d: Duration) {
        self.snapshots.observe(d);
    }

    /// Samples of the RPC histogram with these labels (0 when none).
    pub fn rpc_count(&self, api: &str, method: &str) -> u64 {
        self.rpc.get(&[("api", api), ("method", method)]).count()
    }

    /// The text exposition; `bots` is the number of bots per state (`running`, `stopped`,
    /// ...), computed by the caller at scrape time (`None` when listing failed).
    pub fn render(&self, bots: Option<&BTreeMap<String, u64>>) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        if let Some(bots) = bots {
            let _ = writeln!(
                out,
                "# HELP memoh_bots Bots by task state.\n# TYPE memoh_bots gauge"
            );
            let mut all: BTreeMap<&str, u64> = [("running", 0), ("stopped", 0)].into();
            for (state, n) in bots {
                all.insert(state, *n);
            }
            for (state, n) in all {
                let _ = writeln!(out, "memoh_bots{{state=\"{}\"}} {n}", escape(state));
            }
        }
        counter(
            &mut out,
            "memoh_bot_restarts_total",
            "Automatic restarts of bots whose server exited.",
            &self.restarts,
        );
        counter(
            &mut out,
            "memoh_cni_retries_total",
            "CNI ADDs retried after removing leftovers.",
            &self.cni_retries,
        );
        counter(
            &mut out,
            "memoh_cni_errors_total",
            "Failed attachments of a bot to the network.",
            &self.cni_errors,
        );
        counter(
            &mut out,
            "memoh_bot_lost_states_total",
            "Bots whose state containerd lost in a snapshot commit it was killed in; each went \
             back to its last version.",
            &self.lost_states,
        );
        counter(
            &mut out,
            "memoh_stale_bundles_removed_total",
            "Task bundles a killed containerd left half-deleted, removed by the agent before \
             starting their bot (the bot could not start until then).",
            &self.stale_bundles,
        );
        let _ = writeln!(
            out,
            "# HELP memoh_pool_evictions_total Channels dropped from the connection pool.\n\
             # TYPE memoh_pool_evictions_total counter"
        );
        for why in Eviction::ALL {
            let _ = writeln!(
                out,
                "memoh_pool_evictions_total{{reason=\"{}\"}} {}",
                why.as_str(),
                self.evictions[why as usize].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP memoh_rpc_duration_seconds Control socket gRPC calls until the response \
             headers (streams: until the stream opens).\n\
             # TYPE memoh_rpc_duration_seconds histogram"
        );
        self.rpc.write(&mut out, "memoh_rpc_duration_seconds");
        let _ = writeln!(
            out,
            "# HELP memoh_mcp_tool_call_duration_seconds MCP tool calls.\n\
             # TYPE memoh_mcp_tool_call_duration_seconds histogram"
        );
        self.tools
            .write(&mut out, "memoh_mcp_tool_call_duration_seconds");
        let _ = writeln!(
            out,
            "# HELP memoh_snapshot_cycle_duration_seconds Completed snapshot cycles.\n\
             # TYPE memoh_snapshot_cycle_duration_seconds histogram"
        );
        self.snapshots
            .write(&mut out, "memoh_snapshot_cycle_duration_seconds", "");
        out
    }
}

/// Times every call of a gRPC service into [`global`]'s RPC histogram.
#[derive(Debug, Clone)]
pub struct Timed<S> {
    inner: S,
    api: &'static str,
}

impl<S> Timed<S> {
    /// Wraps `inner`; its calls are recorded with label `api`.
    pub fn new(api: &'static str, inner: S) -> Self {
        Self { inner, api }
    }
}

impl<S: NamedService> NamedService for Timed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Timed<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let api = self.api;
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            global().rpc(api, &method, started.elapsed());
            r
        })
    }
}

/// Runs `fut` and records its duration as an MCP tool call.
pub async fn time_tool<T>(server: &str, tool: &str, fut: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let r = fut.await;
    global().tool_call(server, tool, started.elapsed());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition() {
        let m = Metrics::default();
        m.restart();
        m.restart();
        m.cni_retry();
        m.eviction(Eviction::Failure);
        m.rpc("proxy", "Exec", Duration::from_millis(3));
        m.rpc("proxy", "Exec", Duration::from_millis(700));
        m.tool_call("builtin", "read", Duration::from_micros(100));
        m.snapshot(Duration::from_secs(2));
        let bots = BTreeMap::from([("running".to_string(), 2), ("paused".to_string(), 1)]);
        let text = m.render(Some(&bots));
        for line in [
            "# TYPE memoh_bots gauge",
            "memoh_bots{state=\"running\"} 2",
            "memoh_bots{state=\"stopped\"} 0",
            "memoh_bots{state=\"paused\"} 1",
            "memoh_bot_restarts_total 2",
            "memoh_cni_retries_total 1",
            "memoh_cni_errors_total 0",
            "memoh_pool_evictions_total{reason=\"failure\"} 1",
            "memoh_pool_evictions_total{reason=\"route_changed\"} 0",
            "# TYPE memoh_rpc_duration_seconds histogram",
            "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"0.0025\"} 0",
            "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"0.005\"} 1",
            "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"1\"} 2",
            "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"+Inf\"} 2",
            "memoh_rpc_duration_seconds_sum{api=\"proxy\",method=\"Exec\"} 0.703",
            "memoh_rpc_duration_seconds_count{api=\"proxy\",method=\"Exec\"} 2",
            "memoh_mcp_tool_call_duration_seconds_count{server=\"builtin\",tool=\"read\"} 1",
            "memoh_snapshot_cycle_duration_seconds_bucket{le=\"1\"} 0",
            "memoh_snapshot_cycle_duration_seconds_bucket{le=\"2.5\"} 1",
            "memoh_snapshot_cycle_duration_seconds_sum 2",
            "memoh_snapshot_cycle_duration_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Every sample line is `name{labels} value` or `name value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "bad sample {l:?}");
        }
        // Without a bot list the gauge is left out rather than reported as zero.
        assert!(!m.render(None).contains("memoh_bots{"));
    }

    #[test]
    fn label_sets_are_capped() {
        let m = Metrics::default();
        for i in 0..MAX_SERIES + 5 {
            m.rpc("control", &format!("M{i}"), Duration::from_millis(1));
        }
        assert_eq!(m.rpc_count("other", "other"), 5);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
