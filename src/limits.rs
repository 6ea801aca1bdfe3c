//! Sizes and defaults that the agent, the server and their clients share.

use std::time::Duration;

/// Largest gRPC message either side accepts or sends (16 MiB).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Largest chunk of a raw transfer (ReadRaw / WriteRaw).
pub const RAW_CHUNK_SIZE: usize = 64 * 1024;
/// Port the server listens on inside every bot container.
pub const SERVER_PORT: u16 = 9090;
/// Default listen address of the server (all interfaces, port 9090).
pub const DEFAULT_LISTEN_ADDR: &str = ":9090";
/// Default data directory inside the container.
pub const DEFAULT_DATA_DIR: &str = "/data";
/// Default template directory copied into the data directory on first start.
pub const DEFAULT_TEMPLATE_DIR: &str = "/opt/mcp-template";
/// Default exec timeout when the caller gives none (or zero / negative).
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for unary calls made through [`crate::ContainerClient`].
pub const DEFAULT_UNARY_DEADLINE: Duration = Duration::from_secs(30);
/// Metadata key that routes a container-service call through the agent to one bot.
pub const BOT_METADATA_KEY: &str = "x-memoh-bot";
/// Longest path (in bytes) accepted by the server, as Linux's `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;
