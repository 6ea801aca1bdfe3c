//! Shared setup of the in-process server tests: a [`TestServer`] that runs the real
//! `container_server::run` on a temporary unix socket with a temporary data directory, hands
//! out the real clients, and shuts the server down when dropped; plus helpers to inspect
//! `/proc`, make test data and drain exec streams.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use container_server::{Config, Listener, ServerError};
use memoh_proto::client::unix_channel;
use memoh_proto::pb::mcpcontainer as pb;
use memoh_proto::pb::mcpcontainer::container_service_client::ContainerServiceClient;
use memoh_proto::ContainerClient;
use pb::exec_output::Stream as Kind;
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A bearer token used by the authentication tests.
pub const TOKEN: &str = "s3cret-token";

/// How to start a [`TestServer`].
pub struct Builder {
    root: TempDir,
    config: Config,
}

impl Builder {
    /// The temporary root: `data/` is the data directory, `template/` the template directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The data directory (not created yet, unless a test made it).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The template directory (created on demand by tests).
    pub fn template_dir(&self) -> PathBuf {
        self.root.path().join("template")
    }

    /// Requires `authorization: Bearer TOKEN`.
    pub fn token(mut self, t: &str) -> Self {
        self.config.auth_token = Some(t.to_string());
        self
    }

    /// Sets the shutdown grace period.
    pub fn grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }

    /// Sets the exec timeout used when a request gives none.
    pub fn default_exec_timeout(mut self, d: Duration) -> Self {
        self.config.default_exec_timeout = d;
        self
    }

    /// Starts the ReverseHTTP listener on a free loopback port (see
    /// [`TestServer::reverse_http_addr`]); requests wait `timeout` for the host's answer.
    pub fn reverse_http(self, timeout: Duration) -> Self {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        let addr = probe.local_addr().expect("local addr");
        drop(probe);
        self.reverse_http_at(&addr.to_string(), timeout)
    }

    /// Asks for the ReverseHTTP listener on `addr` exactly (a refused one included).
    pub fn reverse_http_at(mut self, addr: &str, timeout: Duration) -> Self {
        self.config.reverse_http_addr = Some(addr.to_string());
        self.config.reverse_http_timeout = timeout;
        self
    }

    /// Changes the process service's settings (its directory is `ROOT/processes` unless set
    /// here).
    pub fn processes(
        mut self,
        f: impl FnOnce(&mut container_server::process::ProcessConfig),
    ) -> Self {
        f(&mut self.config.processes);
        self
    }

    /// Binds the socket and spawns `container_server::run` on the current runtime.
    pub async fn start(self) -> TestServer {
        let socket = self.root.path().join("server.sock");
        let listener = UnixListener::bind(&socket).expect("bind test socket");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let handle = tokio::spawn(container_server::run(
            Listener::Unix(listener),
            self.config.clone(),
            shutdown,
        ));
        let channel = unix_channel(&socket);
        let client = ContainerClient::new(channel.clone());
        TestServer {
            data: self.root.path().join("data"),
            socket,
            channel,
            client,
            config: self.config,
            shutdown: Some(tx),
            handle: Some(handle),
            root: self.root,
        }
    }
}

/// The real server on a temporary unix socket. Dropping it fires the shutdown future.
pub struct TestServer {
    /// The data directory (`ROOT/data`).
    pub data: PathBuf,
    /// The unix socket the server listens on.
    pub socket: PathBuf,
    /// A lazily connecting channel to the server.
    pub channel: Channel,
    /// The typed client, without a token.
    pub client: ContainerClient,
    /// The configuration the server runs with.
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServerError>>>,
    root: TempDir,
}

impl TestServer {
    /// A builder with a fresh temporary root, no token, a 1 s grace and no template files.
    pub fn builder() -> Builder {
        let root = tempfile::Builder::new()
            .prefix("cs-test-")
            .tempdir()
            .expect("tempdir");
        let mut config = Config::new(root.path().join("data"));
        config.template_dir = root.path().join("template");
        config.auth_token = None;
        config.shutdown_grace = Duration::from_secs(1);
        config.reap_all = false;
        config.default_exec_timeout = Duration::from_secs(30);
        config.processes.dir = root.path().join("processes");
        Builder { root, config }
    }

    /// Starts a server with the default settings.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// The temporary root directory (parent of the data directory).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `data/rel` on disk.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.data.join(rel)
    }

    /// The generated client on the same channel, with the 16 MiB limits of the typed client.
    pub fn raw(&self) -> ContainerServiceClient<Channel> {
        ContainerServiceClient::new(self.channel.clone())
            .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
    }

    /// The `bridgepb` client on the same channel, with the 16 MiB limits.
    pub fn bridge(
        &self,
    ) -> memoh_proto::pb::bridgepb::container_service_client::ContainerServiceClient<Channel> {
        memoh_proto::pb::bridgepb::container_service_client::ContainerServiceClient::new(
            self.channel.clone(),
        )
        .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
    }

    /// The process service's client on the same channel, with the 16 MiB limits.
    pub fn processes(
        &self,
    ) -> memoh_proto::pb::process::process_service_client::ProcessServiceClient<Channel> {
        memoh_proto::pb::process::process_service_client::ProcessServiceClient::new(
            self.channel.clone(),
        )
        .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
    }

    /// The ReverseHTTP listener's address, once it accepts connections (the builder's
    /// `reverse_http` must have been called).
    pub async fn reverse_http_addr(&self) -> std::net::SocketAddr {
        let addr: std::net::SocketAddr = self
            .config
            .reverse_http_addr
            .as_deref()
            .expect("built with reverse_http")
            .parse()
            .expect("socket address");
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("reverse http listener on {addr} did not come up");
    }

    /// A typed client sending `authorization: Bearer token`.
    pub fn client_with_token(&self, token: &str) -> ContainerClient {
        ContainerClient::with_auth(self.channel.clone(), Some(token), None).expect("token")
    }

    /// Fires the shutdown future and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.trigger_shutdown();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), handle)
            .await
            .expect("run() returns after shutdown")
            .expect("server task did not panic")
    }

    /// Fires the shutdown future without waiting.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Takes the server task's handle, to await `run`'s return.
    pub fn take_handle(&mut self) -> JoinHandle<Result<(), ServerError>> {
        self.handle.take().expect("running")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.trigger_shutdown();
    }
}

/// Asserts that `r` failed with `code`, returning the status for further checks.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code) -> Status {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The permission bits (and setuid/setgid/sticky) of `p`.
pub fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

/// Sorted names in `dir`.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Names in `dir` that look like a leftover temporary file of an atomic write.
pub fn temp_files_in(dir: &Path) -> Vec<String> {
    names_in(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp") || n.starts_with(".tmp") || n.contains(".tmp"))
        .collect()
}

static COUNTER: AtomicU32 = AtomicU32::new(1);

/// A `sleep` argument that no other process on the machine uses: `BASE.<pid><n>`, so the
/// process can be found in `/proc` by its command line.
pub fn unique_sleep(base: u32) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{base}.{}{n:03}", std::process::id())
}

/// Pids of live (non-zombie) processes whose command line contains `marker`.
pub fn pids_matching(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.is_empty() {
            continue; // a zombie or a kernel thread
        }
        let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(marker) {
            continue;
        }
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(true);
        if !zombie {
            out.push(pid);
        }
    }
    out
}

/// Waits up to `within` for a process whose command line contains `marker` to appear.
pub async fn wait_running(marker: &str, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if !pids_matching(marker).is_empty() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `within` for every process whose command line contains `marker` to be gone.
/// Returns the pids still there at the end (empty on success).
pub async fn wait_gone(marker: &str, within: Duration) -> Vec<i32> {
    let end = Instant::now() + within;
    loop {
        let left = pids_matching(marker);
        if left.is_empty() || Instant::now() > end {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills leftover processes of a failed test so they do not outlive the suite.
pub fn kill_leftovers(marker: &str) {
    for pid in pids_matching(marker) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Every message of an exec stream, in order, and how the stream ended.
#[derive(Debug, Default)]
pub struct Transcript {
    /// (kind, data, exit_code) per message.
    pub messages: Vec<(Kind, Vec<u8>, i32)>,
    /// The error the stream ended with, if any.
    pub error: Option<Status>,
}

impl Transcript {
    /// Reads the stream to its end.
    pub async fn read<S>(out: &mut S) -> Self
    where
        S: futures::Stream<Item = Result<pb::ExecOutput, tonic::Status>> + Unpin,
    {
        use futures::StreamExt;
        let mut t = Transcript::default();
        loop {
            match out.next().await.transpose() {
                Ok(Some(m)) => {
                    let kind = Kind::try_from(m.stream).expect("known stream kind");
                    t.messages.push((kind, m.data.to_vec(), m.exit_code));
                }
                Ok(None) => return t,
                Err(s) => {
                    t.error = Some(s);
                    return t;
                }
            }
        }
    }

    /// Concatenated data of `kind`.
    pub fn data(&self, kind: Kind) -> Vec<u8> {
        let mut v = Vec::new();
        for (k, d, _) in &self.messages {
            if *k == kind {
                v.extend_from_slice(d);
            }
        }
        v
    }

    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.data(Kind::Stdout)).into_owned()
    }

    /// Stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.data(Kind::Stderr)).into_owned()
    }

    /// Asserts the stream ended cleanly with exactly one EXIT message, the last one, carrying
    /// no data; returns its exit code.
    #[track_caller]
    pub fn exit_code(&self) -> i32 {
        assert!(self.error.is_none(), "stream failed: {:?}", self.error);
        let exits: Vec<usize> = self
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.0 == Kind::Exit)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            exits.len(),
            1,
            "exactly one EXIT message: {:?}",
            self.kinds()
        );
        assert_eq!(
            exits[0],
            self.messages.len() - 1,
            "EXIT is the last message"
        );
        let (_, data, code) = &self.messages[exits[0]];
        assert!(data.is_empty(), "EXIT carries no data");
        for (k, _, c) in &self.messages[..exits[0]] {
            assert_eq!(*c, 0, "{k:?} message carries no exit code");
        }
        *code
    }

    fn kinds(&self) -> Vec<Kind> {
        self.messages.iter().map(|m| m.0).collect()
    }
}

/// The first exec message for `command`.
pub fn exec_input(command: &str) -> pb::ExecInput {
    pb::ExecInput {
        command: command.to_string(),
        ..Default::default()
    }
}

/// Runs `input` with no further stdin (the client half-closes at once) and reads everything.
pub async fn run_exec(client: &ContainerClient, input: pb::ExecInput) -> Transcript {
    let mut out = client
        .exec(input, futures::stream::empty())
        .await
        .expect("exec starts");
    Transcript::read(&mut out).await
}
