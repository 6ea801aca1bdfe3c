//! System test of the agent's router for `bridgepb.ContainerService` (tier 3): calls of the
//! bridge package on the agent's socket reach the bot named by `x-memoh-bot` (a unary call, a
//! bridge-only field, a streaming call both ways), and an unknown bot is NOT_FOUND as for
//! `mcpcontainer`.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the test prints "skipped"
//! and passes, except under `CI`, where it fails.

mod common;

use common::{block_on, Env, TestAgent};
use memoh_proto::client::unix_channel;
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::ContainerClient;

type Bridge = bp::container_service_client::ContainerServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        memoh_proto::client::CallMetadata,
    >,
>;

fn bridge(socket: &std::path::Path, bot: &str) -> Bridge {
    let c = ContainerClient::with_auth(unix_channel(socket), None, Some(bot)).unwrap();
    bp::container_service_client::ContainerServiceClient::new(c.http())
}

#[test]
fn bridgepb_calls_reach_the_bot_through_the_agent() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("bridge");
    let socket = a.socket.clone();
    block_on(async {
        let mut b = bridge(&socket, &bot);
        b.mkdir(bp::MkdirRequest { path: "pb".into() })
            .await
            .expect("Mkdir through the agent");
        b.write_file(bp::WriteFileRequest {
            path: "pb/a.txt".into(),
            content: "one\ntwo\n".into(),
        })
        .await
        .expect("WriteFile through the agent");
        let st = b
            .stat(bp::StatRequest {
                path: "pb/a.txt".into(),
            })
            .await
            .expect("Stat through the agent")
            .into_inner()
            .entry
            .expect("an entry");
        assert_eq!((st.size, st.is_dir), (8, false), "{st:?}");
        // `limit` and `total_count` exist only in bridgepb: the bot answered under that name.
        let ls = b
            .list_dir(bp::ListDirRequest {
                path: "pb".into(),
                limit: 1,
                ..Default::default()
            })
            .await
            .expect("ListDir through the agent")
            .into_inner();
        assert_eq!(ls.total_count, 1, "{ls:?}");
        assert_eq!(ls.entries.len(), 1, "{ls:?}");
        // A streaming call, stdin in and output out, with a clean half-close.
        let first = bp::ExecInput {
            command: "cat; exit 4".into(),
            stdin_data: "hi there".into(),
            ..Default::default()
        };
        let mut out = b
            .exec(tokio_stream::iter(vec![first]))
            .await
            .expect("Exec through the agent")
            .into_inner();
        let (mut stdout, mut exit) = (Vec::new(), None);
        while let Some(m) = out.message().await.expect("Exec output") {
            match bp::exec_output::Stream::try_from(m.stream) {
                Ok(bp::exec_output::Stream::Stdout) => stdout.extend_from_slice(&m.data),
                Ok(bp::exec_output::Stream::Exit) => exit = Some(m.exit_code),
                _ => {}
            }
        }
        assert_eq!(String::from_utf8_lossy(&stdout), "hi there");
        assert_eq!(exit, Some(4));
        b.delete_file(bp::DeleteFileRequest {
            path: "pb".into(),
            recursive: true,
        })
        .await
        .expect("DeleteFile through the agent");

        let mut nobody = bridge(&socket, &format!("{bot}x"));
        let e = nobody
            .stat(bp::StatRequest { path: "/".into() })
            .await
            .expect_err("a bot that does not exist");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    });
}
