use super::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn m(v: &[&str]) -> Vec<SpecMount> {
    v.iter().map(|x| parse_mount(x).unwrap()).collect()
}

fn mounts(v: &[&str]) -> Result<BotSpec, AgentError> {
    let ms = v
        .iter()
        .map(|x| parse_mount(x))
        .collect::<Result<Vec<_>, _>>()?;
    BotSpec::parse(&[], &[], &[], "", ms)
}

#[test]
fn env_entries_parse_and_bad_names_are_refused() {
    let spec = BotSpec::parse(&s(&["A=1", "B=x=y", "C=", "_D9=z"]), &[], &[], "", vec![]).unwrap();
    assert_eq!(
        spec.env,
        vec![
            ("A".into(), "1".into()),
            ("B".into(), "x=y".into()),
            ("C".into(), "".into()),
            ("_D9".into(), "z".into())
        ]
    );
    for bad in [
        "1A=x",
        "A-B=x",
        "=x",
        "NOEQUALS",
        "A B=x",
        "MCP_AUTH_TOKEN_FILE=/x",
    ] {
        let e = BotSpec::parse(&s(&[bad]), &[], &[], "", vec![]).unwrap_err();
        assert!(e.to_string().contains("env"), "{bad}: {e}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}

#[test]
fn dns_hostname_and_search_are_checked() {
    let spec = BotSpec::parse(
        &[],
        &s(&["10.0.0.2", "2001:db8::1"]),
        &s(&["corp.example", "example.org."]),
        "web-1.corp",
        vec![],
    )
    .unwrap();
    assert_eq!(spec.dns.len(), 2);
    assert_eq!(spec.hostname_of("b1"), "web-1.corp");
    assert_eq!(BotSpec::default().hostname_of("b1"), "b1");
    let bad = [
        BotSpec::parse(&[], &s(&["nope"]), &[], "", vec![]),
        BotSpec::parse(&[], &s(&["0.0.0.0"]), &[], "", vec![]),
        BotSpec::parse(
            &[],
            &s(&["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"]),
            &[],
            "",
            vec![],
        ),
        BotSpec::parse(&[], &[], &s(&["bad_domain"]), "", vec![]),
        BotSpec::parse(&[], &[], &[], "-x", vec![]),
        BotSpec::parse(&[], &[], &[], "a b", vec![]),
        BotSpec::parse(&[], &[], &[], &"h".repeat(65), vec![]),
    ];
    for r in bad {
        assert!(matches!(r, Err(AgentError::InvalidArgument(_))), "{r:?}");
    }
}

#[test]
fn mount_targets_are_checked() {
    let ok = BotSpec::parse(
        &[],
        &[],
        &[],
        "",
        m(&["/srv/data:/data", "/srv/x:/opt/x:ro"]),
    )
    .unwrap();
    assert_eq!(ok.mounts[1].container, PathBuf::from("/opt/x"));
    assert!(ok.bind_mounts().iter().all(|b| b.readonly));
    for bad in [
        "/srv:/",
        "/srv:/proc",
        "/srv:/proc/x",
        "/srv:/sys/fs",
        "/srv:/dev",
        "/srv:/run/memoh",
        "/srv:/run",
        "/srv:/etc",
        "/srv:/etc/resolv.conf",
        "/srv:relative",
        "/srv:/a/../proc",
        "relative:/data",
        "/srv:/data:rw",
        "/srv",
        "/srv:/a:/b",
    ] {
        let e = mounts(&[bad]).unwrap_err();
        assert!(e.to_string().contains("mount"), "{bad}: {e}");
    }
    let e = mounts(&["/a:/data", "/b:/data/"]).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn host_dirs_must_lie_under_an_allowed_one_after_symlinks() {
    let t = tempfile::tempdir().unwrap();
    let allowed = t.path().join("allowed");
    let other = t.path().join("other");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(allowed.join("file"), "x").unwrap();
    std::os::unix::fs::symlink(&other, allowed.join("escape")).unwrap();
    std::os::unix::fs::symlink(allowed.join("sub"), other.join("inside")).unwrap();
    let one = |host: &Path, allow: &[PathBuf]| {
        BotSpec {
            mounts: vec![SpecMount {
                host: host.to_path_buf(),
                container: "/data".into(),
            }],
            ..Default::default()
        }
        .resolve_mounts(allow)
    };
    let a = std::slice::from_ref(&allowed);
    let r = one(&allowed.join("sub"), a).unwrap();
    assert_eq!(
        r.mounts[0].host,
        std::fs::canonicalize(allowed.join("sub")).unwrap()
    );
    // A symlink elsewhere that points inside is fine: its real path counts.
    assert!(one(&other.join("inside"), a).is_ok());
    for (host, allow, says) in [
        (
            other.clone(),
            a.to_vec(),
            "not under a directory mount_allowed",
        ),
        (allowed.join("escape"), a.to_vec(), "not under"),
        (allowed.join("file"), a.to_vec(), "not a directory"),
        (allowed.join("missing"), a.to_vec(), "No such file"),
        (
            allowed.clone(),
            vec![],
            "mount_allowed in agent.toml is empty",
        ),
    ] {
        let e = one(&host, &allow).unwrap_err().to_string();
        assert!(e.contains(says), "{}: {e}", host.display());
        assert!(!e.contains('\n'));
    }
}

#[test]
fn the_label_round_trips_and_the_default_has_none() {
    assert!(BotSpec::default().labels().is_empty());
    assert_eq!(
        BotSpec::from_labels(&HashMap::new()).unwrap(),
        BotSpec::default()
    );
    let spec = BotSpec::parse(
        &s(&["A=1"]),
        &s(&["9.9.9.9"]),
        &s(&["x.example"]),
        "h",
        m(&["/srv:/data"]),
    )
    .unwrap();
    let labels = spec.labels();
    assert_eq!(BotSpec::from_labels(&labels).unwrap(), spec);
    let bad = HashMap::from([(LABEL_SPEC.to_string(), "{".to_string())]);
    assert!(BotSpec::from_labels(&bad).is_err());
}

#[test]
fn a_spec_too_large_to_record_is_refused() {
    let big = format!("A={}", "x".repeat(SPEC_LABEL_MAX));
    let e = BotSpec::parse(&s(&[&big]), &[], &[], "", vec![]).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    // Quotes count escaped, as the record label holds them.
    let quotes = format!("A={}", "\"".repeat(SPEC_LABEL_MAX / 2));
    assert!(BotSpec::parse(&s(&[&quotes]), &[], &[], "", vec![]).is_err());
}

#[test]
fn an_old_record_gets_the_bots_own_resolv_conf() {
    let image = crate::containerd::ImageConfig {
        env: vec![],
        entrypoint: vec!["/s".into()],
        cmd: vec![],
        working_dir: String::new(),
        user: String::new(),
    };
    let mut opts = crate::containerd::spec::SpecOptions::new("mcp-b", "b");
    opts.resolv_conf = Some(HOST_RESOLV_CONF.into());
    let mut spec = crate::containerd::spec::build_spec(&image, &opts).unwrap();
    let own = Path::new("/var/lib/memoh-agent/bots/b/resolv.conf");
    assert!(bind_resolv_conf(&mut spec, own));
    assert!(!bind_resolv_conf(&mut spec, own));
    let m = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new(HOST_RESOLV_CONF))
        .unwrap();
    assert_eq!(m.source().as_deref(), Some(own));
    assert!(m.options().as_ref().unwrap().contains(&"ro".to_string()));
}

const FALLBACK: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(1, 1, 1, 1)),
    IpAddr::V4(std::net::Ipv4Addr::new(8, 8, 8, 8)),
];

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn host_resolv_conf_loses_its_loopback_resolvers() {
    let d = BotSpec::default();
    // systemd-resolved's stub: replaced by the fallback, the rest kept.
    let stub = "# comment\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n";
    assert_eq!(
        lines(&resolv_conf(&d, stub, &FALLBACK)),
        [
            "options edns0 trust-ad",
            "search lan",
            "nameserver 1.1.1.1",
            "nameserver 8.8.8.8"
        ]
    );
    // A real resolver beside a loopback one: the real one only, no fallback.
    let mixed = "nameserver ::1\nnameserver 192.168.1.1\nnameserver 127.0.0.1\n";
    assert_eq!(
        lines(&resolv_conf(&d, mixed, &FALLBACK)),
        ["nameserver 192.168.1.1"]
    );
    // Nothing at all (no host file): the fallback.
    assert_eq!(
        lines(&resolv_conf(&d, "", &FALLBACK)),
        ["nameserver 1.1.1.1", "nameserver 8.8.8.8"]
    );
    // A scoped IPv6 resolver is kept as written.
    assert_eq!(
        lines(&resolv_conf(&d, "nameserver fe80::1%eth0\n", &FALLBACK)),
        ["nameserver fe80::1%eth0"]
    );
}

#[test]
fn the_bots_own_dns_replaces_the_hosts() {
    let own = BotSpec::parse(
        &[],
        &s(&["10.1.2.3", "2001:db8::53"]),
        &s(&["a.example", "b.example"]),
        "",
        vec![],
    )
    .unwrap();
    let host = "nameserver 192.168.1.1\nsearch lan\noptions ndots:2\n";
    assert_eq!(
        lines(&resolv_conf(&own, host, &FALLBACK)),
        [
            "nameserver 10.1.2.3",
            "nameserver 2001:db8::53",
            "search a.example b.example"
        ]
    );
    // Search domains alone: the host's nameservers and options, the bot's search.
    let search_only = BotSpec::parse(&[], &[], &s(&["a.example"]), "", vec![]).unwrap();
    assert_eq!(
        lines(&resolv_conf(&search_only, host, &FALLBACK)),
        [
            "nameserver 192.168.1.1",
            "options ndots:2",
            "search a.example"
        ]
    );
}
