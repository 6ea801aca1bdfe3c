//! Tests of the fake itself: it must follow containerd's rules the lifecycle relies on.

use super::*;
use crate::containerd::label_filter;
use crate::containerd::prelude::*;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn label_filters_read_back_what_label_filter_builds() {
    for (key, value) in [
        ("mcp.bot_id", Some("b1")),
        ("mcp.bot_id", None),
        ("odd \"key\"", Some("a\\b")),
    ] {
        let f = label_filter(key, value);
        assert_eq!(
            parse_label_filter(&f).unwrap(),
            (key.to_string(), value.map(str::to_string)),
            "{f}"
        );
    }
    for bad in [
        "",
        "labels.",
        "name==x",
        r#"labels."a"=b"#,
        r#"labels."a"=="b"x"#,
    ] {
        assert!(parse_label_filter(bad).is_err(), "{bad:?}");
    }
    let l = labels(&[("mcp.bot_id", "b1")]);
    assert!(matches(&l, &[]).unwrap());
    assert!(matches(&l, &[label_filter("mcp.bot_id", Some("b1"))]).unwrap());
    assert!(matches(&l, &[label_filter("mcp.bot_id", None)]).unwrap());
    assert!(!matches(&l, &[label_filter("mcp.bot_id", Some("b2"))]).unwrap());
    // Filters are alternatives.
    assert!(matches(
        &l,
        &[
            label_filter("x", None),
            label_filter("mcp.bot_id", Some("b1"))
        ]
    )
    .unwrap());
}

#[tokio::test]
async fn snapshots_commit_have_children_and_are_lost() {
    let rt = FakeRuntime::new();
    let img = rt.add_image("busybox");
    let l = labels(&[("mcp.bot_id", "b")]);
    rt.prepare_snapshot("k", Some(&img.chain_id), &l)
        .await
        .unwrap();
    // A parent must be committed; a key is taken once.
    assert!(rt.prepare_snapshot("k2", Some("k"), &l).await.is_err());
    assert!(rt.prepare_snapshot("k", None, &l).await.is_err());
    rt.write("k", "/data/f", "x");
    assert_eq!(
        rt.snapshot_usage("k").await.unwrap(),
        Some(SnapshotUsage { size: 1, inodes: 2 })
    );
    rt.commit_snapshot("v", "k", &labels(&[("memoh.version", "1")]))
        .await
        .unwrap();
    assert_eq!(rt.stat_snapshot("k").await.unwrap(), None);
    let v = rt.stat_snapshot("v").await.unwrap().unwrap();
    assert_eq!(
        (v.kind, v.parent.as_deref()),
        (SnapshotKind::Committed, Some(img.chain_id.as_str()))
    );
    assert_eq!(v.labels, labels(&[("memoh.version", "1")]));
    rt.prepare_snapshot("a", Some("v"), &l).await.unwrap();
    assert_eq!(rt.view("a").get("/data/f").map(String::as_str), Some("x"));
    assert!(rt.view("a").contains_key("/app/mcp"));
    assert!(rt.remove_snapshot("v").await.is_err(), "v has a child");
    // Lost: invisible, still a child of v, removable once.
    rt.lose("a");
    assert_eq!(rt.stat_snapshot("a").await.unwrap(), None);
    assert_eq!(rt.snapshot_usage("a").await.unwrap(), None);
    let listed = rt
        .list_snapshots(&[label_filter("mcp.bot_id", Some("b"))])
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        rt.remove_snapshot("v").await.is_err(),
        "v still has a child"
    );
    assert!(rt.remove_snapshot("a").await.unwrap());
    assert!(!rt.remove_snapshot("a").await.unwrap());
    assert!(rt.remove_snapshot("v").await.unwrap());
}

#[tokio::test]
async fn tasks_containers_and_exit_events() {
    let rt = FakeRuntime::new();
    let mut exits = rt.subscribe_task_exits().await.unwrap();
    let spec = oci_spec::runtime::Spec::default();
    let new = NewContainer {
        id: "mcp-b".into(),
        image: "img".into(),
        snapshot_key: "mcp-b".into(),
        labels: labels(&[("mcp.bot_id", "b")]),
        spec,
    };
    rt.create_container(&new).await.unwrap();
    assert!(
        rt.create_container(&new).await.is_err(),
        "ids are taken once"
    );
    rt.create_task("mcp-b", &[], &TaskIo::default())
        .await
        .unwrap();
    rt.start_task("mcp-b").await.unwrap();
    let e = rt.delete_container("mcp-b").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(rt.delete_task("mcp-b").await.is_err(), "it runs");
    assert!(rt
        .wait_task("mcp-b", Duration::from_millis(10))
        .await
        .is_err());
    rt.kill_task("mcp-b", libc::SIGTERM, false).await.unwrap();
    let exit = rt.wait_task("mcp-b", Duration::from_secs(1)).await.unwrap();
    assert_eq!(exit.exit_status, 143);
    assert_eq!(exits.next().await.unwrap().unwrap(), exit);
    let st = rt.task_status("mcp-b").await.unwrap().unwrap();
    assert_eq!((st.state, st.exit_status), (TaskState::Stopped, Some(143)));
    rt.delete_task("mcp-b").await.unwrap();
    let c = rt
        .update_container_labels("mcp-b", &labels(&[("mcp.bot_id", ""), ("x", "1")]))
        .await
        .unwrap();
    assert_eq!(c.labels, labels(&[("x", "1")]));
    assert!(rt.delete_container("mcp-b").await.unwrap());
    assert!(!rt.delete_container("mcp-b").await.unwrap());
}

#[tokio::test]
async fn faults_fire_on_the_nth_call_before_or_after_the_work() {
    let rt = FakeRuntime::new();
    let l = HashMap::new();
    rt.fail("prepare_snapshot", 2);
    rt.prepare_snapshot("a", None, &l).await.unwrap();
    assert!(rt.prepare_snapshot("b", None, &l).await.is_err());
    assert_eq!(rt.stat_snapshot("b").await.unwrap(), None, "failed before");
    rt.prepare_snapshot("b", None, &l).await.unwrap();
    rt.fail_after("prepare_snapshot", 1);
    let e = rt.prepare_snapshot("c", None, &l).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(rt.snapshot("c").is_some(), "done, answer lost");
    rt.fail_always("get_container");
    for _ in 0..3 {
        assert!(rt.get_container("x").await.is_err());
    }
    rt.heal("get_container");
    assert!(rt.get_container("x").await.unwrap().is_none());
    assert!(rt.pending_faults().is_empty());
    assert!(rt
        .pull_image("x", &PullOptions::default(), &super::super::no_progress)
        .await
        .unwrap_err()
        .to_string()
        .contains("fake runtime"));
}

#[test]
fn garbage_collection_keeps_what_is_held() {
    let rt = FakeRuntime::new();
    let img = rt.add_image("busybox");
    {
        let mut s = lock(&rt.state);
        for (key, parent, root) in [("held", None, true), ("loose", None, false)] {
            let at = s.now();
            let l = if root {
                labels(&[(LABEL_GC_ROOT, "x")])
            } else {
                HashMap::new()
            };
            s.snapshots.insert(
                key.to_string(),
                Snapshot {
                    info: SnapshotInfo {
                        name: key.into(),
                        parent,
                        kind: SnapshotKind::Active,
                        labels: l,
                        created_at: Some(at),
                        updated_at: Some(at),
                    },
                    files: BTreeMap::new(),
                    ghost: false,
                },
            );
        }
    }
    assert_eq!(rt.collect_garbage(), vec!["loose".to_string()]);
    assert!(rt.snapshot(&img.chain_id).is_some());
    assert!(rt.snapshot("held").is_some());
}
