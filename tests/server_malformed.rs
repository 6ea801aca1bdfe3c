//! Hostile input on the wire (tier 2, in-process): every RPC of the real server gets raw,
//! malformed protobuf frames (wrong wire types, truncated varints, overlong lengths, invalid
//! UTF-8 in strings, 100 000 repeated entries, deep and long paths). Each call must end with a
//! status within a deadline, and the server must still answer `Stat` afterwards.

mod common;
#[path = "support/raw.rs"]
mod raw;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use raw::{bytes_field, varint, RawCodec};
use tonic::{Code, Status};

/// Every RPC of `mcpcontainer.ContainerService`.
const RPCS: [&str; 10] = [
    "ReadFile",
    "WriteFile",
    "ListDir",
    "Stat",
    "Mkdir",
    "Rename",
    "Exec",
    "ReadRaw",
    "WriteRaw",
    "DeleteFile",
];

/// The hostile bodies sent to every RPC, with a name for failure messages. None of them can
/// name `/` or leave the data directory (no `..`, no absolute paths), so a request that happens
/// to be valid only touches the test's temporary directory.
fn hostile_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty message", vec![]),
        // Field 1 is a string everywhere; send it as a varint, a fixed64 and a fixed32.
        ("string as varint", vec![0x08, 0x05]),
        ("string as fixed64", vec![0x09, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("string as fixed32", vec![0x0d, 1, 2, 3, 4]),
        // Field 2 (int32/bool/bytes) as a string, field 3 as an unterminated group.
        ("int as string", vec![0x12, 0x03, b'a', b'b', b'c']),
        ("start group without end", vec![0x1b, 0x08, 0x01]),
        ("end group alone", vec![0x0c]),
        ("wire type 7", vec![0x0f, 0x00]),
        ("truncated varint value", vec![0x10, 0xff, 0xff]),
        ("truncated tag", vec![0x80]),
        ("varint of eleven bytes", {
            let mut v = vec![0x10];
            v.extend([0xff; 10]);
            v.push(0x01);
            v
        }),
        (
            "length past the end",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a'],
        ),
        (
            "length short by one",
            vec![0x0a, 0x05, b'a', b'b', b'c', b'd'],
        ),
        ("field number zero", vec![0x02, 0x01, b'a']),
        ("largest field number", {
            let mut v = Vec::new();
            varint((((1u64 << 29) - 1) << 3) | 2, &mut v);
            v.extend([0x01, b'a']);
            v
        }),
        ("invalid utf-8 in field 1", {
            let mut v = Vec::new();
            bytes_field(1, b"ok\xff\xfe\xc0\x80", &mut v);
            v
        }),
        ("invalid utf-8 in field 2", {
            let mut v = Vec::new();
            bytes_field(1, b"f.txt", &mut v);
            bytes_field(2, b"\xed\xa0\x80", &mut v);
            v
        }),
        ("overlong bool", {
            let mut v = Vec::new();
            bytes_field(1, b"f.txt", &mut v);
            v.push(0x10);
            varint(u64::MAX, &mut v);
            v
        }),
        ("negative int32 as ten-byte varint", {
            let mut v = Vec::new();
            bytes_field(1, b"f.txt", &mut v);
            v.push(0x18);
            varint(u64::MAX - 5, &mut v);
            v
        }),
        ("long path", {
            let mut v = Vec::new();
            bytes_field(1, "x".repeat(5000).as_bytes(), &mut v);
            bytes_field(2, "y".repeat(5000).as_bytes(), &mut v);
            v
        }),
        ("10 000 path components", {
            let mut v = Vec::new();
            bytes_field(1, "a/".repeat(10_000).as_bytes(), &mut v);
            bytes_field(2, "b/".repeat(10_000).as_bytes(), &mut v);
            v
        }),
        ("path just under the limit", {
            let mut v = Vec::new();
            let p = format!("{}f", "d/".repeat(2047));
            bytes_field(1, p.as_bytes(), &mut v);
            bytes_field(2, p.as_bytes(), &mut v);
            v
        }),
        ("NUL in path", {
            let mut v = Vec::new();
            bytes_field(1, b"a\0b", &mut v);
            v
        }),
        ("field 1 repeated 100 000 times", {
            let mut v = Vec::new();
            for i in 0..100_000u32 {
                bytes_field(1, format!("p{i}").as_bytes(), &mut v);
            }
            v
        }),
    ];
    // 100 000 entries of field 3 (`env` of ExecInput, an int32 elsewhere).
    let mut env = Vec::new();
    bytes_field(1, b"true", &mut env);
    for i in 0..100_000u32 {
        bytes_field(3, format!("K{i}=v").as_bytes(), &mut env);
    }
    cases.push(("100 000 env entries", env));
    // A packed field 3 of 100 000 varints.
    let mut packed = Vec::new();
    let mut body = Vec::new();
    for i in 0..100_000u64 {
        varint(i, &mut body);
    }
    bytes_field(3, &body, &mut packed);
    cases.push(("100 000 packed varints", packed));
    cases.push(("random bytes", common::pseudo_random(4096, 7)));
    cases
}

/// Sends `frames` to `rpc` as raw messages and drains the answer. `Ok(code)` is the status
/// the call ended with (OK included); `Err` means no status arrived in time.
async fn call_raw(s: &TestServer, rpc: &str, frames: Vec<Bytes>) -> Result<Code, String> {
    let mut grpc = tonic::client::Grpc::new(s.channel.clone())
        .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE);
    let path = format!("/mcpcontainer.ContainerService/{rpc}")
        .parse()
        .expect("path");
    let run = async move {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let req = tonic::Request::new(tokio_stream::iter(frames));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_malformed_messages_with_a_status() {
    let s = TestServer::start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    std::fs::write(s.path("f.txt"), b"hello\n").unwrap();
    // Hostile bodies may delete or rename files inside the data directory, never the
    // directory itself.
    let data = s.data.to_str().expect("utf-8 temp path").to_string();
    let bodies = hostile_bodies();
    let mut failures = Vec::new();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for rpc in RPCS {
        for (name, body) in &bodies {
            let body = Bytes::from(body.clone());
            // Streaming RPCs also get the hostile frame after a valid-looking first one.
            let mut sends = vec![vec![body.clone()]];
            if rpc == "Exec" || rpc == "WriteRaw" {
                let mut first = Vec::new();
                bytes_field(1, b"w.txt", &mut first);
                sends.push(vec![Bytes::from(first), body]);
            }
            for frames in sends {
                match call_raw(&s, rpc, frames).await {
                    Ok(code) => *codes.entry(format!("{code:?}")).or_default() += 1,
                    Err(e) => failures.push(format!("{rpc} / {name}: {e}")),
                }
            }
            let alive = tokio::time::timeout(Duration::from_secs(10), s.client.stat(&data)).await;
            if !matches!(alive, Ok(Ok(_))) {
                failures.push(format!("{rpc} / {name}: Stat afterwards failed: {alive:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The malformed frames were refused, not silently taken.
    assert!(codes.get("Internal").is_some_and(|n| *n > 0), "{codes:?}");
    eprintln!("status codes: {codes:?}");
}
