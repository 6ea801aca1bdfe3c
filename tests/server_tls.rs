//! Strict mutual TLS on the bridge's TCP listener (WIRE-BRIDGE.md section 2), with a test CA
//! made here: the expected client gets in on both services; a certificate of another identity,
//! of another CA, with the server's usage only, no certificate at all, and plain HTTP/2 are all
//! refused at the handshake; a client that never finishes its handshake holds up no one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use container_server::tls::StrictTls;
use container_server::{Config, Listener};
use hyper_util::rt::TokioIo;
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::pb::mcpcontainer as mp;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

const INSTANCE: &str = "i-1";
const SERVER_URI: &str = "spiffe://memoh/instance/i-1/server";
const BRIDGE_NAME: &str = "memoh-bridge.i-1.bridge.memoh.internal";

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf certificate and its key.
    fn leaf_pem(
        &self,
        dns: &[&str],
        uri: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        p.subject_alt_names
            .push(SanType::URI(uri.to_string().try_into().unwrap()));
        p.extended_key_usages = vec![usage];
        (p.signed_by(&key, &self.cert, &self.key).unwrap(), key)
    }

    /// A leaf certificate and its key, as a TLS client presents them.
    fn leaf(
        &self,
        dns: &[&str],
        uri: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (cert, key) = self.leaf_pem(dns, uri, usage);
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

struct Server {
    addr: SocketAddr,
    ca: Ca,
    _dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("memoh test ca");
    let (cert, key) = ca.leaf_pem(
        &[BRIDGE_NAME],
        &format!("spiffe://memoh/instance/{INSTANCE}/bridge"),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let tls = StrictTls {
        cert_file: write("cert.pem", cert.pem()),
        key_file: write("key.pem", key.serialize_pem()),
        client_ca_file: write("ca.pem", ca.cert.pem()),
        expected_client_uri: SERVER_URI.to_string(),
    };
    let config = tls.server_config().expect("server tls config");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut c = Config::new(dir.path().join("data"));
    c.template_dir = dir.path().join("template");
    c.processes.dir = dir.path().join("processes");
    std::fs::create_dir_all(&c.data_dir).unwrap();
    std::fs::write(c.data_dir.join("hello.txt"), "hi\n").unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(container_server::run_all(
        vec![Listener::Tls(l, config)],
        c,
        async move {
            let _ = rx.await;
        },
    ));
    Server {
        addr,
        ca,
        _dir: dir,
        stop: Some(tx),
    }
}

/// A client presenting `identity` (or none), trusting `trust`.
fn client_config(
    trust: &Ca,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.cert.der().clone()).unwrap();
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut c = match identity {
        Some((cert, key)) => b.with_client_auth_cert(vec![cert], key).unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// A gRPC channel over TLS with `config`.
async fn channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Channel, String> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from(BRIDGE_NAME).unwrap();
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{BRIDGE_NAME}:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connect)
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn stat_over(ch: Channel) -> Result<(), tonic::Status> {
    let mut b = bp::container_service_client::ContainerServiceClient::new(ch);
    b.stat(bp::StatRequest {
        path: "hello.txt".into(),
    })
    .await
    .map(|_| ())
}

#[tokio::test]
async fn the_expected_client_gets_in_on_both_services() {
    let s = start().await;
    let me =
        s.ca.leaf(&[], SERVER_URI, ExtendedKeyUsagePurpose::ClientAuth);
    let ch = channel(s.addr, client_config(&s.ca, Some(me)))
        .await
        .expect("connect with the expected identity");
    stat_over(ch.clone())
        .await
        .expect("bridgepb Stat over mTLS");
    let mut m = mp::container_service_client::ContainerServiceClient::new(ch);
    let r = m
        .read_file(mp::ReadFileRequest {
            path: "hello.txt".into(),
            ..Default::default()
        })
        .await
        .expect("mcpcontainer ReadFile over mTLS")
        .into_inner();
    assert!(r.content.contains("hi"), "{r:?}");
}

#[tokio::test]
async fn every_other_client_is_refused_at_the_handshake() {
    let s = start().await;
    let other_ca = Ca::new("another ca");
    let cases = [
        (
            "another instance's identity",
            Some(s.ca.leaf(
                &[],
                "spiffe://memoh/instance/i-2/server",
                ExtendedKeyUsagePurpose::ClientAuth,
            )),
        ),
        (
            "a bridge's identity (server usage)",
            Some(s.ca.leaf(&[], SERVER_URI, ExtendedKeyUsagePurpose::ServerAuth)),
        ),
        (
            "the right identity from another CA",
            Some(other_ca.leaf(&[], SERVER_URI, ExtendedKeyUsagePurpose::ClientAuth)),
        ),
        ("no certificate", None),
    ];
    for (what, identity) in cases {
        let refused = match channel(s.addr, client_config(&s.ca, identity)).await {
            Err(_) => true,
            // TLS 1.3 reports a refused client certificate after the client's handshake ends:
            // the first call fails then.
            Ok(ch) => stat_over(ch).await.is_err(),
        };
        assert!(refused, "{what} got in");
    }
    // Plain HTTP/2 (no TLS) gets nothing either.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", s.addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(stat_over(ch).await.is_err(), "plain h2c got in");
    }
}

#[tokio::test]
async fn a_silent_client_holds_up_no_one() {
    let s = start().await;
    // Connects and never says anything.
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let me =
        s.ca.leaf(&[], SERVER_URI, ExtendedKeyUsagePurpose::ClientAuth);
    let ch = tokio::time::timeout(
        Duration::from_secs(5),
        channel(s.addr, client_config(&s.ca, Some(me))),
    )
    .await
    .expect("a good client waits on no silent one")
    .expect("connect");
    stat_over(ch).await.expect("call");
    let _ = silent.shutdown().await;
}
