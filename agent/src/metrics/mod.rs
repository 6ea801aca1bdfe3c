//! Prometheus metrics, served as text exposition at `/metrics` on the MCP HTTP listener.
//!
//! Holds [`Metrics`] (every family the agent keeps, in one `prometheus-client` registry),
//! [`global`] (the process-wide one), [`Eviction`], the bucket sets, the [`Timed`] service
//! wrapper and [`time_tool`].
//!
//! One process-wide [`Metrics`] ([`global`], a `OnceLock`): the counters are bumped from a
//! single line at each instrumented spot (restarts in `bots/watch.rs`, CNI retries and errors
//! in `network/mod.rs`, evictions in `pool.rs`, snapshot cycles in `bots/versions.rs`), so
//! nothing has to thread a handle through the lifecycle manager. Bots by state is a gauge
//! computed at scrape time from the manager's list and passed to [`Metrics::render`]. Tests
//! render a private [`Metrics`] instead of the global one.
//!
//! The output is the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
//!
//! # Adding a metric
//!
//! A metric that lives as long as the agent is a field of [`Metrics`] plus one line in
//! [`Metrics::default`] that registers it; a method bumps it. Label sets are small structs
//! deriving `EncodeLabelSet`. Per-bot memory, for example:
//!
//! ```ignore
//! #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
//! struct BotLabels { bot: String }
//! // field:    bot_memory: Family<BotLabels, Gauge>,
//! // register: bot_memory: add(r, "memoh_bot_memory_bytes", "Memory in use per bot", Family::default()),
//! // update:   self.bot_memory.get_or_create(&BotLabels { bot }).set(bytes);
//! ```
//!
//! Counters are registered without the `_total` suffix: the encoder appends it. A value only
//! known at scrape time (like bots by state) goes into the per-scrape registry built in
//! [`Metrics::render`] instead, so a scrape never shows stale series of a bot that is gone.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{
    prometheus_text, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tonic::codegen::{http, Service};
use tonic::server::NamedService;

/// Latency buckets of RPCs and tool calls, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of a whole snapshot cycle (stop, commit, prepare, recreate, start), in seconds.
pub const SNAPSHOT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// The `Content-Type` of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;
/// Most label sets a histogram family keeps; later ones are folded into `other`.
const MAX_SERIES: usize = 128;

/// Why the pool dropped a bot's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

impl EncodeLabelValue for Eviction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

/// Labels of `memoh_pool_evictions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: Eviction,
}

/// Labels of `memoh_rpc_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    api: String,
    method: String,
}

/// Labels of `memoh_mcp_tool_call_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ToolLabels {
    server: String,
    tool: String,
}

/// Labels of `memoh_bots`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// Labels of the per-bot families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BotLabels {
    bot: String,
}

/// One bot's figures at a scrape; `None` is a figure the bot has not got (no task, no limit,
/// not measured yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BotSample {
    /// The bot id.
    pub bot: String,
    /// Its state (`running`, `stopped`, `paused`, ...).
    pub state: String,
    /// Memory in use, bytes.
    pub memory_bytes: Option<u64>,
    /// Its memory limit, bytes.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used since its task started, seconds.
    pub cpu_seconds: Option<f64>,
    /// Its CPU limit, in CPUs.
    pub cpu_limit: Option<f64>,
    /// Processes and threads now.
    pub pids: Option<u64>,
    /// Its process limit.
    pub pids_limit: Option<u64>,
    /// Bytes in its writable layer.
    pub disk_bytes: Option<u64>,
    /// The bound of its writable layer, bytes.
    pub disk_limit_bytes: Option<u64>,
    /// Processes the kernel killed at its memory limit since its task started.
    pub oom_kills: Option<u64>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// Registers `metric` in `r` under `name` and hands it back: one line per metric.
/// `help` has no final period (the registry adds it).
fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// A histogram family that keeps at most [`MAX_SERIES`] label sets; later ones share the
/// series of an `other` label set, so odd method or tool names cannot grow it without end.
#[derive(Debug)]
struct Capped<S> {
    family: Family<S, Histogram>,
    /// Label sets created so far (the `other` one not counted).
    series: Mutex<usize>,
}

impl<S: Clone + Hash + Eq> Capped<S> {
    fn new(family: Family<S, Histogram>) -> Self {
        Self {
            family,
            series: Mutex::new(0),
        }
    }

    /// The series of `labels`, or of `other` once the family is full.
    fn get(&self, labels: S, other: S) -> Histogram {
        if let Some(h) = self.family.get(&labels) {
            return Histogram::clone(&h);
        }
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock: another call may have created it meanwhile.
        if let Some(h) = self.family.get(&labels) {
            return Histogram::clone(&h);
        }
        if *series >= MAX_SERIES {
            return self.family.get_or_create_owned(&other);
        }
        *series += 1;
        self.family.get_or_create_owned(&labels)
    }
}

/// Every metric the agent keeps, and the registry they are encoded from.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    restarts: Counter,
    cni_retries: Counter,
    cni_errors: Counter,
    lost_states: Counter,
    stale_bundles: Counter,
    oom_kills: Counter,
    evictions: Family<ReasonLabels, Counter>,
    rpc: Capped<RpcLabels>,
    tools: Capped<ToolLabels>,
    snapshots: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let r = &mut Registry::default();
        // Fields are evaluated in the order written: the registry is taken last, full.
        let m = Self {
            restarts: add(
                r,
                "memoh_bot_restarts",
                "Automatic restarts of bots whose server exited",
                Counter::default(),
            ),
            cni_retries: add(
                r,
                "memoh_cni_retries",
                "CNI ADDs retried after removing leftovers",
                Counter::default(),
            ),
            cni_errors: add(
                r,
                "memoh_cni_errors",
                "Failed attachments of a bot to the network",
                Counter::default(),
            ),
            lost_states: add(
                r,
                "memoh_bot_lost_states",
                "Bots whose state containerd lost in a snapshot commit it was killed in; each \
                 went back to its last version",
                Counter::default(),
            ),
            stale_bundles: add(
                r,
                "memoh_stale_bundles_removed",
                "Task bundles a killed containerd left half-deleted, removed by the agent before \
                 starting their bot (the bot could not start until then)",
                Counter::default(),
            ),
            oom_kills: add(
                r,
                "memoh_oom_kills",
                "Processes of bots the kernel killed at their bot's memory limit, as the agent \
                 saw them (per bot: memoh_bot_oom_kills_total)",
                Counter::default(),
            ),
            evictions: add(
                r,
                "memoh_pool_evictions",
                "Channels dropped from the connection pool",
                Family::default(),
            ),
            rpc: Capped::new(add(
                r,
                "memoh_rpc_duration_seconds",
                "Control socket gRPC calls until the response headers (streams: until the \
                 stream opens)",
                Family::new_with_constructor(latency_histogram),
            )),
            tools: Capped::new(add(
                r,
                "memoh_mcp_tool_call_duration_seconds",
                "MCP tool calls",
                Family::new_with_constructor(latency_histogram),
            )),
            snapshots: add(
                r,
                "memoh_snapshot_cycle_duration_seconds",
                "Completed snapshot cycles",
                Histogram::new(SNAPSHOT_BUCKETS.iter().copied()),
            ),
            registry: std::mem::take(r),
        };
        // Every reason is scraped from the start, at zero.
        for reason in Eviction::ALL {
            let _ = m.evictions.get_or_create(&ReasonLabels { reason });
        }
        m
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
        self.restarts.inc();
    }

    /// CNI ADD failed on leftovers and is retried after a DEL.
    pub fn cni_retry(&self) {
        self.cni_retries.inc();
    }

    /// Attaching a bot to the network failed.
    pub fn cni_error(&self) {
        self.cni_errors.inc();
    }

    /// containerd lost a bot's state mid-commit; recovery put the bot back on an older one.
    pub fn lost_state(&self) {
        self.lost_states.inc();
    }

    /// A task bundle a killed containerd left half-deleted was removed before a start.
    pub fn stale_bundle_removed(&self) {
        self.stale_bundles.inc();
    }

    /// The kernel killed `n` processes of a bot at its memory limit.
    pub fn oom_kills(&self, n: u64) {
        self.oom_kills.inc_by(n);
    }

    /// The pool dropped a channel.
    pub fn eviction(&self, why: Eviction) {
        self.evictions
            .get_or_create(&ReasonLabels { reason: why })
            .inc();
    }

    /// One gRPC call on the control socket (`api` is `control` or `proxy`) took `d`.
    pub fn rpc(&self, api: &str, method: &str, d: Duration) {
        self.rpc
            .get(rpc_labels(api, method), rpc_labels("other", "other"))
            .observe(d.as_secs_f64());
    }

    /// One MCP tool call took `d` (`server` is `builtin` or `stdio`).
    pub fn tool_call(&self, server: &str, tool: &str, d: Duration) {
        let labels = |server: &str, tool: &str| ToolLabels {
            server: server.to_string(),
            tool: tool.to_string(),
        };
        self.tools
            .get(labels(server, tool), labels("other", "other"))
            .observe(d.as_secs_f64());
    }

    /// A snapshot cycle finished in `d`.
    pub fn snapshot(&self, d: Duration) {
        self.snapshots.observe(d.as_secs_f64());
    }

    /// Samples of the RPC histogram with these labels (0 when none), read back through the
    /// encoder as a scraper would.
    pub fn rpc_count(&self, api: &str, method: &str) -> u64 {
        if self.rpc.family.get(&rpc_labels(api, method)).is_none() {
            return 0;
        }
        let mut r = Registry::default();
        r.register("rpc", "", self.rpc.family.clone());
        let mut text = String::new();
        if prometheus_text::encode(&mut text, &r).is_err() {
            return 0;
        }
        let series = format!(
            "rpc_count{{api=\"{}\",method=\"{}\"}}",
            escape(api),
            escape(method)
        );
        sample(&text, &series).map_or(0, |v| v as u64)
    }

    /// The text exposition ([`CONTENT_TYPE`]); `bots` is every bot with its figures, taken by
    /// the caller at scrape time (`None` when listing failed: the per-bot families are left out
    /// rather than reported as zero).
    pub fn render(&self, bots: Option<&[BotSample]>) -> String {
        // Values known only now live in a registry of this scrape, so a bot that is gone
        // leaves no stale series behind.
        let scrape = &mut Registry::default();
        if let Some(bots) = bots {
            let family: Family<StateLabels, Gauge> = add(
                scrape,
                "memoh_bots",
                "Bots by task state",
                Family::default(),
            );
            let state = |s: &str| StateLabels {
                state: s.to_string(),
            };
            for s in ["running", "stopped"] {
                let _ = family.get_or_create(&state(s));
            }
            for b in bots {
                family.get_or_create(&state(&b.state)).inc();
            }
            per_bot(scrape, bots);
        }
        let mut out = String::new();
        for r in [&*scrape, &self.registry] {
            if let Err(e) = prometheus_text::encode(&mut out, r) {
                tracing::warn!(error = %e, "encoding metrics failed");
            }
        }
        out
    }
}

/// The per-bot families of one scrape.
fn per_bot(r: &mut Registry, bots: &[BotSample]) {
    type F = Family<BotLabels, Gauge>;
    type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
    type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let memory: F = add(
        r,
        "memoh_bot_memory_bytes",
        "Memory in use per bot",
        F::default(),
    );
    let memory_limit: F = add(
        r,
        "memoh_bot_memory_limit_bytes",
        "Memory limit per bot (absent: unlimited)",
        F::default(),
    );
    let cpu: Family<BotLabels, FloatCounter> = add(
        r,
        "memoh_bot_cpu_seconds",
        "CPU time used per bot since its task started",
        Family::default(),
    );
    let cpu_limit: Family<BotLabels, FloatGauge> = add(
        r,
        "memoh_bot_cpu_limit",
        "CPU limit per bot, in CPUs (absent: unlimited)",
        Family::default(),
    );
    let pids: F = add(
        r,
        "memoh_bot_pids",
        "Processes and threads per bot",
        F::default(),
    );
    let pids_limit: F = add(
        r,
        "memoh_bot_pids_limit",
        "Process limit per bot (absent: unlimited)",
        F::default(),
    );
    let disk: F = add(
        r,
        "memoh_bot_disk_bytes",
        "Bytes in each bot's writable layer (measured about once a minute)",
        F::default(),
    );
    let disk_limit: F = add(
        r,
        "memoh_bot_disk_limit_bytes",
        "Bound of each bot's writable layer (absent: unlimited)",
        F::default(),
    );
    let ooms: Family<BotLabels, Counter> = add(
        r,
        "memoh_bot_oom_kills",
        "Processes the kernel killed at the bot's memory limit since its task started",
        Family::default(),
    );
    for b in bots {
        let l = BotLabels { bot: b.bot.clone() };
        let set = |f: &F, v: Option<u64>| {
            if let Some(v) = v {
                f.get_or_create(&l).set(int(v));
            }
        };
        set(&memory, b.memory_bytes);
        set(&memory_limit, b.memory_limit_bytes);
        set(&pids, b.pids);
        set(&pids_limit, b.pids_limit);
        set(&disk, b.disk_bytes);
        set(&disk_limit, b.disk_limit_bytes);
        if let Some(v) = b.cpu_seconds {
            cpu.get_or_create(&l).inc_by(v);
        }
        if let Some(v) = b.cpu_limit {
            cpu_limit.get_or_create(&l).set(v);
        }
        if let Some(v) = b.oom_kills {
            ooms.get_or_create(&l).inc_by(v);
        }
    }
}

fn rpc_labels(api: &str, method: &str) -> RpcLabels {
    RpcLabels {
        api: api.to_string(),
        method: method.to_string(),
    }
}

/// A label value as the exposition format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The value of `series` (`name{labels}` exactly as encoded) in exposition `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))?
        .parse()
        .ok()
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
mod tests;
