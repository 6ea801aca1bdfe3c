//! System tests of the containerd layer against a private containerd (never the system one).
//!
//! Needs root, containerd 1.6 with runc, and `scripts/test-env.sh up`; reads
//! `MEMOH_TEST_CONTAINERD_SOCK`, `MEMOH_TEST_IMAGE_TAR` (from `scripts/build-image.sh`),
//! `MEMOH_TEST_REGISTRY` (pull test) and `MEMOH_TEST_RUNC_ROOT`. Without them the tests say
//! "skipped" and pass, except under `CI`, where they fail.
//!
//! Every test works in a namespace of its own and removes all it made (tasks, containers,
//! snapshots, images, leases, content, the namespace itself), whether it passed or not.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient,
    namespaces_client::NamespacesClient, snapshots::snapshots_client::SnapshotsClient,
    snapshots::ListSnapshotsRequest, tasks_client::TasksClient, DeleteContentRequest,
    DeleteNamespaceRequest, DeleteRequest as DeleteLeaseRequest, ListContentRequest,
    ListRequest as ListLeasesRequest, ListTasksRequest,
};
use futures::{FutureExt, StreamExt};
use memoh_agent::containerd::spec::{build_spec, SpecOptions};
use memoh_agent::containerd::{
    chain_id, label_filter, no_progress, prelude::*, Containerd, NewContainer, Progress,
    ProgressPhase, PullOptions, SnapshotKind, TaskIo, TaskState, LABEL_BOT_ID, LABEL_GC_ROOT,
};
use memoh_agent::AgentError;

use common::Env;

const IMAGE: &str = "docker.io/memohai/mcp:latest";
const SNAPSHOTTER: &str = "overlayfs";
const RUNTIME: &str = "io.containerd.runc.v2";

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

async fn connect(env: &Env, namespace: &str) -> Containerd {
    let c = Containerd::connect(&env.sock, namespace, SNAPSHOTTER, RUNTIME)
        .await
        .expect("connect to the private containerd");
    match &env.runc_root {
        Some(r) => c.with_runc_root(r),
        None => c,
    }
}

/// Runs `body` in a fresh namespace, then removes everything in that namespace and the
/// namespace itself, also when `body` panicked. A clean test must leave nothing behind.
async fn in_namespace<F, Fut>(env: &Env, name: &str, body: F)
where
    F: FnOnce(Containerd) -> Fut,
    Fut: Future<Output = ()>,
{
    let ns = unique(&format!("memoh-cdtest-{name}"));
    let c = connect(env, &ns).await;
    let outcome = AssertUnwindSafe(body(c.clone())).catch_unwind().await;
    let cleaned = cleanup_namespace(&c, &ns).await;
    match outcome {
        Err(panic) => {
            if let Err(e) = cleaned {
                eprintln!("cleanup of {ns} after failure: {e}");
            }
            std::panic::resume_unwind(panic);
        }
        Ok(()) => cleaned.unwrap_or_else(|e| panic!("namespace {ns} not empty after test: {e}")),
    }
}

/// A request carrying namespace `ns`.
fn md<T>(ns: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    r
}

/// Removes tasks, containers, images, snapshots, leases and content of `ns`, then `ns`.
async fn cleanup_namespace(c: &Containerd, ns: &str) -> Result<(), String> {
    let ch = c.channel();
    let tasks = TasksClient::new(ch.clone())
        .list(md(ns, ListTasksRequest::default()))
        .await
        .map(|r| r.into_inner().tasks)
        .unwrap_or_default();
    // containerd 1.6 lists tasks by `id` and leaves `container_id` empty.
    let mut ids: Vec<String> = tasks
        .into_iter()
        .map(|t| {
            if t.container_id.is_empty() {
                t.id
            } else {
                t.container_id
            }
        })
        .collect();
    let containers = c.list_containers(&[]).await.map_err(|e| e.to_string())?;
    ids.extend(containers.iter().map(|ct| ct.id.clone()));
    for id in &ids {
        if c.task_status(id).await.ok().flatten().is_some() {
            let _ = c.kill_task(id, 9, true).await;
            let _ = c.wait_task(id, Duration::from_secs(10)).await;
            let _ = c.delete_task(id).await;
        }
    }
    for ct in containers {
        c.delete_container(&ct.id)
            .await
            .map_err(|e| e.to_string())?;
    }
    for img in c.list_images().await.map_err(|e| e.to_string())? {
        c.delete_image(&img.name).await.map_err(|e| e.to_string())?;
    }
    let leases = LeasesClient::new(ch.clone())
        .list(md(ns, ListLeasesRequest::default()))
        .await
        .map(|r| r.into_inner().leases)
        .unwrap_or_default();
    for l in leases {
        let _ = LeasesClient::new(ch.clone())
            .delete(md(
                ns,
                DeleteLeaseRequest {
                    id: l.id,
                    sync: true,
                },
            ))
            .await;
    }
    // Children before parents: retry while something goes away.
    for _ in 0..32 {
        let mut stream = match SnapshotsClient::new(ch.clone())
            .list(md(
                ns,
                ListSnapshotsRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    filters: vec![],
                },
            ))
            .await
        {
            Ok(s) => s.into_inner(),
            Err(_) => break,
        };
        let mut names = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            names.extend(m.info.into_iter().map(|i| i.name));
        }
        if names.is_empty() {
            break;
        }
        for n in names {
            let _ = c.remove_snapshot(&n).await;
        }
    }
    let mut stream = ContentClient::new(ch.clone())
        .list(md(ns, ListContentRequest::default()))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut digests = Vec::new();
    while let Some(Ok(m)) = stream.next().await {
        digests.extend(m.info.into_iter().map(|i| i.digest));
    }
    for d in digests {
        let _ = ContentClient::new(ch.clone())
            .delete(md(ns, DeleteContentRequest { digest: d }))
            .await;
    }
    NamespacesClient::new(ch)
        .delete(tonic::Request::new(DeleteNamespaceRequest {
            name: ns.to_string(),
        }))
        .await
        .map(|_| ())
        .or_else(|s| {
            if s.code() == tonic::Code::NotFound {
                Ok(())
            } else {
                Err(format!("delete namespace: {}", s.message()))
            }
        })
}

fn recorder() -> (
    std::sync::Arc<Mutex<Vec<Progress>>>,
    impl Fn(Progress) + Send + Sync,
) {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |p| s.lock().unwrap().push(p))
}

async fn wait_for_file(path: &Path, needles: &[&str], timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "{} lacks {needles:?} after {timeout:?}: {text:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn import_resolve_run_and_remove() {
    let Some(env) = Env::get(false) else { return };
    let env = &env;
    in_namespace(env, "run", |c| async move {
        // Import, twice: the second finds everything in place.
        let (seen, progress) = recorder();
        let names = c.import_archive(&env.tar, None, &progress).await.unwrap();
        assert_eq!(names, vec![IMAGE.to_string()]);
        {
            let seen = seen.lock().unwrap();
            for phase in [
                ProgressPhase::Reading,
                ProgressPhase::Writing,
                ProgressPhase::Unpacking,
                ProgressPhase::Done,
            ] {
                assert!(
                    seen.iter().any(|p| p.phase == phase),
                    "no {phase:?} progress: {seen:?}"
                );
            }
            let last_write = seen
                .iter()
                .rfind(|p| p.phase == ProgressPhase::Writing)
                .unwrap();
            assert_eq!(last_write.current, last_write.total, "{last_write:?}");
        }
        let again = c
            .import_archive(&env.tar, None, &no_progress)
            .await
            .unwrap();
        assert_eq!(again, names);
        let images = c.list_images().await.unwrap();
        assert_eq!(images.len(), 1, "{images:?}");
        assert_eq!(images[0].name, IMAGE);

        // Resolve by short name; the chain id is that of the diff ids, and containerd has
        // that snapshot, committed.
        let img = c.resolve_image("memohai/mcp").await.unwrap();
        assert_eq!(img.name, IMAGE);
        assert_eq!(img.target_digest, images[0].target_digest);
        assert!(!img.diff_ids.is_empty());
        assert_eq!(Some(img.chain_id.clone()), chain_id(&img.diff_ids));
        assert!(!img.config.entrypoint.is_empty() || !img.config.cmd.is_empty());
        let snap = c
            .stat_snapshot(&img.chain_id)
            .await
            .unwrap()
            .expect("chain snapshot");
        assert_eq!(snap.kind, SnapshotKind::Committed);
        assert_eq!(c.ensure_unpacked(IMAGE).await.unwrap(), img);

        // A container on a new active snapshot of the image.
        let bot = "b1";
        let id = format!("mcp-{bot}");
        let labels: HashMap<String, String> = [(LABEL_BOT_ID.to_string(), bot.to_string())].into();
        // gc.root keeps the collector off the active snapshot once no container references
        // it (after the container is deleted, the snapshot must stay for the next one).
        let mut snap_labels = labels.clone();
        snap_labels.insert(LABEL_GC_ROOT.into(), "2024-01-01T00:00:00Z".into());
        let mounts = c
            .prepare_snapshot(&id, Some(&img.chain_id), &snap_labels)
            .await
            .unwrap();
        assert!(!mounts.is_empty());
        assert_eq!(c.snapshot_mounts(&id).await.unwrap(), mounts);
        let mut opts = SpecOptions::new(&id, bot).with_host_files();
        opts.args = Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo out-$BOT_MARK; echo err-line >&2; exec sleep 600".into(),
        ]);
        opts.extra_env.push(("BOT_MARK".into(), "hello".into()));
        let spec = build_spec(&img.config, &opts).unwrap();
        let created = c
            .create_container(&NewContainer {
                id: id.clone(),
                image: img.name.clone(),
                snapshot_key: id.clone(),
                labels: labels.clone(),
                spec: spec.clone(),
            })
            .await
            .unwrap();
        assert_eq!(created.runtime, RUNTIME);
        assert_eq!(created.snapshotter, SNAPSHOTTER);
        let got = c.get_container(&id).await.unwrap().expect("container");
        assert_eq!(got.spec.as_ref(), Some(&spec));
        assert_eq!(got.labels, labels);
        let listed = c
            .list_containers(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert!(c
            .list_containers(&[label_filter(LABEL_BOT_ID, Some("other"))])
            .await
            .unwrap()
            .is_empty());
        let updated = c
            .update_container_labels(&id, &[("memoh.test".to_string(), "1".to_string())].into())
            .await
            .unwrap();
        assert_eq!(
            updated.labels.get("memoh.test").map(String::as_str),
            Some("1")
        );
        assert_eq!(
            updated.labels.get(LABEL_BOT_ID).map(String::as_str),
            Some(bot)
        );
        let updated = c
            .update_container_labels(&id, &[("memoh.test".to_string(), String::new())].into())
            .await
            .unwrap();
        assert!(!updated.labels.contains_key("memoh.test"));

        // A task with its output in a host file.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs").join("b1.log");
        assert_eq!(c.task_status(&id).await.unwrap(), None);
        let mut exits = c.subscribe_task_exits().await.unwrap();
        let pid = c
            .create_task(&id, &mounts, &TaskIo::log_file(&log))
            .await
            .unwrap();
        assert!(pid > 0);
        assert_eq!(
            c.task_status(&id).await.unwrap().unwrap().state,
            TaskState::Created
        );
        assert_eq!(c.start_task(&id).await.unwrap(), pid);
        let status = c.task_status(&id).await.unwrap().unwrap();
        assert_eq!(
            (status.state, status.pid, status.exit_status),
            (TaskState::Running, pid, None)
        );
        wait_for_file(&log, &["out-hello", "err-line"], Duration::from_secs(20)).await;

        // Deleting a running task or a container with a task fails; waiting times out.
        let e = c.delete_container(&id).await.unwrap_err();
        assert!(matches!(e, AgentError::FailedPrecondition(_)), "{e}");
        assert!(c.get_container(&id).await.unwrap().is_some());
        let e = c.delete_task(&id).await.unwrap_err();
        assert!(matches!(e, AgentError::FailedPrecondition(_)), "{e}");
        let e = c
            .wait_task(&id, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Timeout(_)), "{e}");

        // Kill: sleep is PID 1 and ignores SIGTERM, so SIGKILL.
        c.kill_task(&id, 9, true).await.unwrap();
        let exit = c.wait_task(&id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(exit.exit_status, 137);
        let event = tokio::time::timeout(Duration::from_secs(20), exits.next())
            .await
            .expect("exit event in time")
            .expect("stream open")
            .unwrap();
        assert_eq!(
            (event.container_id.as_str(), event.exit_status),
            (id.as_str(), 137)
        );
        let status = c.task_status(&id).await.unwrap().unwrap();
        assert_eq!(
            (status.state, status.exit_status),
            (TaskState::Stopped, Some(137))
        );
        let deleted = c.delete_task(&id).await.unwrap().expect("task entry");
        assert_eq!(deleted.exit_status, 137);
        assert_eq!(c.delete_task(&id).await.unwrap(), None);
        assert_eq!(c.task_status(&id).await.unwrap(), None);

        // The log file outlives the task.
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("out-hello"), "{text:?}");

        // Container, snapshot, image.
        assert!(c.delete_container(&id).await.unwrap());
        assert!(!c.delete_container(&id).await.unwrap());
        assert!(c.get_container(&id).await.unwrap().is_none());
        assert!(c.remove_snapshot(&id).await.unwrap());
        assert!(c.stat_snapshot(&id).await.unwrap().is_none());
        assert!(c.delete_image(IMAGE).await.unwrap());
        assert!(!c.delete_image(IMAGE).await.unwrap());
        let e = c.resolve_image(IMAGE).await.unwrap_err();
        assert!(matches!(e, AgentError::ImageNotFound(_)), "{e}");
        // The garbage collector took the unpacked chain with the image.
        let start = Instant::now();
        loop {
            let left = c.list_snapshots(&[]).await.unwrap();
            if left.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "snapshots left: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Listing answers however many containers there are: at about 400 bots the records
/// (10 KiB of spec each) outgrew the 4 MiB one gRPC message may carry by default, and every
/// list (`ListBots`, the watcher's recovery) failed. Six records of 0.9 MiB make 5.4 MiB.
#[tokio::test]
async fn listing_outgrows_one_message() {
    let Some(env) = Env::get(false) else { return };
    let env = &env;
    in_namespace(env, "many", |c| async move {
        c.import_archive(&env.tar, None, &no_progress)
            .await
            .unwrap();
        let img = c.resolve_image(IMAGE).await.unwrap();
        let pad = "x".repeat(900 << 10);
        for i in 0..6 {
            let id = format!("mcp-many{i}");
            let mut opts = SpecOptions::new(&id, format!("many{i}"));
            opts.extra_env.push(("PAD".into(), pad.clone()));
            let spec = build_spec(&img.config, &opts).unwrap();
            c.create_container(&NewContainer {
                id: id.clone(),
                image: img.name.clone(),
                snapshot_key: id.clone(),
                labels: [(LABEL_BOT_ID.to_string(), format!("many{i}"))].into(),
                spec,
            })
            .await
            .unwrap();
        }
        let listed = c.list_containers(&[]).await.expect("list all");
        let mut ids: Vec<_> = listed.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        assert_eq!(
            ids,
            (0..6).map(|i| format!("mcp-many{i}")).collect::<Vec<_>>()
        );
        for ct in &listed {
            let env = ct
                .spec
                .as_ref()
                .and_then(|s| s.process().as_ref())
                .and_then(|p| p.env().clone())
                .unwrap_or_default();
            assert!(
                env.iter()
                    .any(|e| e.len() == pad.len() + 4 && e.starts_with("PAD=x")),
                "{}: the record came back whole",
                ct.id
            );
        }
        let filtered = c
            .list_containers(&[label_filter(LABEL_BOT_ID, Some("many3"))])
            .await
            .unwrap();
        assert_eq!(filtered.len(), 1);
        for i in 0..6 {
            assert!(c.delete_container(&format!("mcp-many{i}")).await.unwrap());
        }
    })
    .await;
}

#[tokio::test]
async fn snapshot_versions_and_labels() {
    let Some(env) = Env::get(false) else { return };
    let env = &env;
    in_namespace(env, "snap", |c| async move {
        c.import_archive(&env.tar, None, &no_progress)
            .await
            .unwrap();
        let img = c.resolve_image(IMAGE).await.unwrap();
        let bot = "b2";
        // Like the agent's own, the active snapshot is a collector root from its first moment:
        // without one, a collection started by any other deletion on the host (other tests run
        // beside this one) removes it before anything references it.
        let labels: HashMap<String, String> = [
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (
                LABEL_GC_ROOT.to_string(),
                "2024-01-01T00:00:00Z".to_string(),
            ),
        ]
        .into();
        c.prepare_snapshot("mcp-b2", Some(&img.chain_id), &labels)
            .await
            .unwrap();
        let active = c.stat_snapshot("mcp-b2").await.unwrap().unwrap();
        assert_eq!(active.kind, SnapshotKind::Active);
        assert_eq!(active.parent.as_deref(), Some(img.chain_id.as_str()));

        // Commit a version, protected from the collector, and continue on top of it.
        let version = "mcp-b2-v-1700000000000000000";
        let mut vlabels = labels.clone();
        vlabels.insert(LABEL_GC_ROOT.into(), "2024-01-01T00:00:00Z".into());
        c.commit_snapshot(version, "mcp-b2", &vlabels)
            .await
            .unwrap();
        assert!(c.stat_snapshot("mcp-b2").await.unwrap().is_none());
        let v = c.stat_snapshot(version).await.unwrap().unwrap();
        assert_eq!(v.kind, SnapshotKind::Committed);
        assert_eq!(v.labels, vlabels);
        c.prepare_snapshot("mcp-b2", Some(version), &labels)
            .await
            .unwrap();

        let mine = c
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await
            .unwrap();
        let mut names: Vec<_> = mine.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["mcp-b2", version]);

        let v = c
            .update_snapshot_labels(
                version,
                &[("memoh.note".to_string(), "x".to_string())].into(),
            )
            .await
            .unwrap();
        assert_eq!(v.labels.get("memoh.note").map(String::as_str), Some("x"));
        assert!(v.labels.contains_key(LABEL_GC_ROOT));
        let v = c
            .update_snapshot_labels(version, &[("memoh.note".to_string(), String::new())].into())
            .await
            .unwrap();
        assert!(!v.labels.contains_key("memoh.note"));

        // A parent with a child cannot go; children first.
        assert!(c.remove_snapshot(version).await.is_err());
        assert!(c.remove_snapshot("mcp-b2").await.unwrap());
        assert!(c.remove_snapshot(version).await.unwrap());
        assert!(!c.remove_snapshot(version).await.unwrap());
    })
    .await;
}

/// Rewrites the test image as a `docker save` archive with one more, uncompressed layer.
fn docker_archive_from(oci_tar: &Path, out: &Path) -> (Vec<String>, String) {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(oci_tar).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        files.insert(p, buf);
    }
    let blob =
        |d: &str| files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))].clone();
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let layer1 = blob(manifest["layers"][0]["digest"].as_str().unwrap());

    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    let hello = b"from the second layer\n";
    h.set_size(hello.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    b.append_data(&mut h, "hello.txt", &hello[..]).unwrap();
    let layer2 = b.into_inner().unwrap();
    let layer2_digest = {
        use sha2::Digest;
        format!("sha256:{:x}", sha2::Sha256::digest(&layer2))
    };
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::Value::String(layer2_digest));
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let tag = "memoh-docker-test:v1";
    let docker_manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [tag],
        "Layers": ["l1/layer.tar", "l2/layer.tar"],
    }]);
    let mut out_tar = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (name, data) in [
        ("l1/layer.tar", layer1),
        ("l2/layer.tar", layer2),
        ("config.json", config_bytes),
        (
            "manifest.json",
            serde_json::to_vec(&docker_manifest).unwrap(),
        ),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out_tar.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    out_tar.finish().unwrap();
    (diff_ids, tag.to_string())
}

#[tokio::test]
async fn docker_archive_with_two_layers_matches_containerd_chain_ids() {
    let Some(env) = Env::get(false) else { return };
    let env = &env;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("docker.tar");
    let (diff_ids, tag) = docker_archive_from(&env.tar, &archive);
    in_namespace(env, "docker", |c| async move {
        let names = c
            .import_archive(&archive, None, &no_progress)
            .await
            .unwrap();
        let name = format!("docker.io/library/{tag}");
        assert_eq!(names, vec![name.clone()]);
        let img = c.resolve_image(&tag).await.unwrap();
        assert_eq!(img.diff_ids, diff_ids);
        let top = chain_id(&diff_ids).unwrap();
        assert_eq!(img.chain_id, top);
        let snap = c
            .stat_snapshot(&top)
            .await
            .unwrap()
            .expect("top of the chain");
        assert_eq!(snap.parent.as_deref(), Some(diff_ids[0].as_str()));

        // containerd's own importer (ctr) names its snapshots the same way.
        let ns = c.namespace().to_string() + "-ctr";
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("-a")
                .arg(&env.sock)
                .arg("-n")
                .arg(&ns)
                .args(args)
                .output()
                .expect("run ctr")
        };
        let out = ctr(&["images", "import", archive.to_str().unwrap()]);
        let listed = ctr(&["snapshots", "ls"]);
        let _ = ctr(&["images", "rm", "--sync", &name]);
        let ctr_client = connect(env, &ns).await;
        let cleaned = cleanup_namespace(&ctr_client, &ns).await;
        assert!(
            out.status.success(),
            "ctr import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&listed.stdout).to_string();
        assert!(listed.contains(&top), "ctr snapshots: {listed}");
        cleaned.unwrap();

        // A name given by the caller wins.
        let names = c
            .import_archive(&archive, Some("memoh/other:v2"), &no_progress)
            .await
            .unwrap();
        assert_eq!(names, vec!["docker.io/memoh/other:v2".to_string()]);
    })
    .await;
}

#[tokio::test]
async fn pull_from_loopback_registry() {
    let Some(env) = Env::get(true) else { return };
    let env = &env;
    let registry = env.registry.clone().unwrap();
    let reference = format!("{registry}/memohai/mcp:test");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", env.tar.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    in_namespace(env, "pull", |c| async move {
        let (seen, progress) = recorder();
        let name = c
            .pull_image(&reference, &PullOptions::default(), &progress)
            .await
            .unwrap();
        assert_eq!(name, reference);
        assert!(seen
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.phase == ProgressPhase::Writing));
        let pulled = c.resolve_image(&reference).await.unwrap();
        assert!(c.stat_snapshot(&pulled.chain_id).await.unwrap().is_some());
        // Pulling again is a no-op; importing the same image shares its chain.
        assert_eq!(
            c.pull_image(&reference, &PullOptions::default(), &no_progress)
                .await
                .unwrap(),
            reference
        );
        c.import_archive(&env.tar, None, &no_progress)
            .await
            .unwrap();
        let imported = c.resolve_image(IMAGE).await.unwrap();
        assert_eq!(imported.chain_id, pulled.chain_id);
        assert_eq!(imported.config, pulled.config);

        let e = c
            .pull_image(
                &format!("{registry}/memohai/absent:nope"),
                &PullOptions::default(),
                &no_progress,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Image { .. }), "{e}");
    })
    .await;
}

#[tokio::test]
async fn errors_name_the_problem() {
    let Some(env) = Env::get(false) else { return };
    let env = &env;
    // containerd down: no socket, and a socket nobody serves.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.sock");
    let e = Containerd::connect(&missing, "default", SNAPSHOTTER, RUNTIME)
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::ContainerdUnreachable { .. }), "{e}");
    assert!(e.to_string().contains("absent.sock"), "{e}");
    let dead = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let e = Containerd::connect(&dead, "default", SNAPSHOTTER, RUNTIME)
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::ContainerdUnreachable { .. }), "{e}");
    let e = Containerd::connect(&env.sock, "bad ns", SNAPSHOTTER, RUNTIME)
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::InvalidArgument(_)), "{e}");

    in_namespace(env, "errors", |c| async move {
        assert!(!c.version().await.unwrap().is_empty());
        let e = c.resolve_image("memohai/absent").await.unwrap_err();
        assert!(
            matches!(e, AgentError::ImageNotFound(ref n) if n == "docker.io/memohai/absent:latest"),
            "{e}"
        );
        let e = c.ensure_unpacked("memohai/absent").await.unwrap_err();
        assert!(matches!(e, AgentError::ImageNotFound(_)), "{e}");
        let e = c.resolve_image("Bad Name").await.unwrap_err();
        assert!(matches!(e, AgentError::InvalidImageRef { .. }), "{e}");

        let not_tar = dir.path().join("not.tar");
        std::fs::write(&not_tar, b"this is not a tar archive at all").unwrap();
        let e = c
            .import_archive(&not_tar, None, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Image { .. }), "{e}");
        let e = c
            .import_archive(&dir.path().join("absent.tar"), None, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Io { .. }), "{e}");

        assert!(c.get_container("mcp-nobody").await.unwrap().is_none());
        assert!(!c.delete_container("mcp-nobody").await.unwrap());
        assert_eq!(c.delete_task("mcp-nobody").await.unwrap(), None);
        assert!(c.stat_snapshot("nothing").await.unwrap().is_none());
        let e = c
            .prepare_snapshot("k", Some("sha256:absent"), &HashMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Containerd { .. }), "{e}");
        let e = c.start_task("mcp-nobody").await.unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::NotFound);
    })
    .await;
}
