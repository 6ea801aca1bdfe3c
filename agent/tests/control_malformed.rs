//! Hostile input on the control socket (tier 3: the real agent, see `common`): control calls
//! get raw, malformed protobuf frames (wrong wire types, truncated varints, invalid UTF-8,
//! 100 000 repeated entries, long and deep ids). Each call must end with a status within a
//! deadline and the agent must keep answering `ListBots`.
//!
//! Calls that would fetch images or make bots (CreateBot, PullImage, ImportImage, Migrate) are
//! left out: a malformed frame that happens to decode must not start real work.

mod common;
#[path = "../../tests/support/raw.rs"]
mod raw;

use std::time::Duration;

use bytes::Bytes;
use common::{block_on, Env, TestAgent};
use memoh_proto::client::unix_channel;
use raw::{bytes_field, RawCodec};
use tonic::transport::Channel;
use tonic::{Code, Status};

const RPCS: [&str; 15] = [
    "StartBot",
    "StopBot",
    "DeleteBot",
    "ListBots",
    "InspectBot",
    "BotLogs",
    "ListImages",
    "Version",
    "CreateSnapshot",
    "ListSnapshots",
    "RollbackSnapshot",
    "RemoveSnapshot",
    "McpAdd",
    "McpList",
    "McpRemove",
];

fn hostile_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = Vec::new();
        f(&mut v);
        v
    };
    vec![
        ("string as varint", vec![0x08, 0x05]),
        ("string as fixed64", vec![0x09, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("uint64 as string", vec![0x12, 0x03, b'a', b'b', b'c']),
        ("start group without end", vec![0x1b, 0x08, 0x01]),
        ("truncated varint", vec![0x10, 0xff, 0xff]),
        (
            "length past the end",
            vec![0x0a, 0xff, 0xff, 0xff, 0x0f, b'a'],
        ),
        (
            "invalid utf-8 id",
            with(&|v| bytes_field(1, b"bot\xff\xfe", v)),
        ),
        (
            "invalid utf-8 name",
            with(&|v| {
                bytes_field(1, b"nobot", v);
                bytes_field(2, b"\xc0\x80", v);
            }),
        ),
        (
            "5000-byte id",
            with(&|v| bytes_field(1, "x".repeat(5000).as_bytes(), v)),
        ),
        (
            "10 000 path components",
            with(&|v| bytes_field(1, "a/".repeat(10_000).as_bytes(), v)),
        ),
        (
            "100 000 repeated command and env entries",
            with(&|v| {
                bytes_field(1, b"nobot", v);
                bytes_field(2, b"srv", v);
                for i in 0..100_000u32 {
                    bytes_field(3, format!("arg{i}").as_bytes(), v);
                    bytes_field(4, format!("K{i}=v").as_bytes(), v);
                }
            }),
        ),
        ("random bytes", random(4096)),
    ]
}

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn call_raw(channel: &Channel, rpc: &str, body: Bytes) -> Result<Code, String> {
    let mut grpc = tonic::client::Grpc::new(channel.clone())
        .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE);
    let path = format!("/memoh.agent.v1.AgentService/{rpc}")
        .parse()
        .expect("path");
    let run = async move {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let req = tonic::Request::new(tokio_stream::iter([body]));
        let mut stream = grpc.streaming(req, path, RawCodec).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, Status>(())
    };
    match tokio::time::timeout(Duration::from_secs(20), run).await {
        Ok(Ok(())) => Ok(Code::Ok),
        Ok(Err(status)) => Ok(status.code()),
        Err(_) => Err("no status within 20 s".into()),
    }
}

#[test]
fn control_calls_answer_malformed_messages_with_a_status() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::start(&env);
    let bodies = hostile_bodies();
    let (failures, codes) = block_on(async {
        let channel = unix_channel(&a.socket);
        let mut failures = Vec::new();
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        for rpc in RPCS {
            for (name, body) in &bodies {
                match call_raw(&channel, rpc, Bytes::from(body.clone())).await {
                    Ok(code) => *codes.entry(format!("{code:?}")).or_default() += 1,
                    Err(e) => failures.push(format!("{rpc} / {name}: {e}")),
                }
                if call_raw(&channel, "ListBots", Bytes::new()).await != Ok(Code::Ok) {
                    failures.push(format!("{rpc} / {name}: ListBots afterwards failed"));
                }
            }
        }
        (failures, codes)
    });
    assert!(a.running(), "the agent exited:\n{}", a.log_tail(30));
    assert!(
        failures.is_empty(),
        "{}\nagent log:\n{}",
        failures.join("\n"),
        a.log_tail(30)
    );
    assert!(codes.get("Internal").is_some_and(|n| *n > 0), "{codes:?}");
    println!("status codes: {codes:?}");
}
