//! Strict mutual TLS for the bridge's TCP listener (WIRE-BRIDGE.md section 2).
//!
//! `BRIDGE_TLS_MODE=strict` puts TLS (1.2 or 1.3) on the TCP listener and admits a client only
//! when its certificate chains to `BRIDGE_TLS_CLIENT_CA_FILE`, allows client authentication
//! (the ClientAuth extended key usage) and carries the URI SAN `BRIDGE_TLS_EXPECTED_CLIENT_URI`
//! (Memoh's host: `spiffe://memoh/instance/<id>/server`). A certificate of the same CA with
//! another identity (another instance's, or a bridge's own) is refused during the handshake,
//! before any call. The server presents `BRIDGE_TLS_CERT_FILE` with `BRIDGE_TLS_KEY_FILE`.
//!
//! TLS unlocks nothing: the TCP address must be loopback whatever the mode
//! ([`crate::config::bridge_listeners`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use tracing::warn;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files and identity of strict mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictTls {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// The CA client certificates must chain to (PEM).
    pub client_ca_file: PathBuf,
    /// The URI SAN a client certificate must carry.
    pub expected_client_uri: String,
}

impl StrictTls {
    /// The server's rustls configuration: every file read and checked now, so a bad file stops
    /// the server at start with its name, not at the first connection.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| file_error("certificate", &self.cert_file, e))?;
        if certs.is_empty() {
            return Err(format!(
                "tls certificate file {} holds no certificate",
                self.cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| file_error("key", &self.key_file, e))?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.client_ca_file)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| file_error("client CA", &self.client_ca_file, e))?;
        for ca in cas {
            roots.add(ca).map_err(|e| {
                format!("tls client CA file {}: {e}", self.client_ca_file.display())
            })?;
        }
        if roots.is_empty() {
            return Err(format!(
                "tls client CA file {} holds no certificate",
                self.client_ca_file.display()
            ));
        }
        let inner = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| format!("tls client verifier: {e}"))?;
        let verifier = Arc::new(PinnedClient {
            inner,
            expected_uri: self.expected_client_uri.clone(),
        });
        // The crate's one crypto provider (ring); TLS 1.3 and 1.2 only.
        let mut config = ServerConfig::builder_with_protocol_versions(&[
            &rustls::version::TLS13,
            &rustls::version::TLS12,
        ])
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls certificate and key do not match: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn file_error(what: &str, path: &Path, e: rustls::pki_types::pem::Error) -> String {
    format!("tls {what} file {}: {e}", path.display())
}

/// Checks what chaining to the CA does not: the client certificate allows client
/// authentication and names the expected client.
pub fn check_client_identity(der: &[u8], expected_uri: &str) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth || eku.value.any => {}
        Ok(_) => return Err("client certificate does not allow client authentication".into()),
        Err(e) => return Err(format!("client certificate key usage: {e}")),
    }
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("client certificate names: {e}")),
    };
    if uris.contains(&expected_uri) {
        Ok(())
    } else {
        Err(format!(
            "client certificate names {uris:?}, not the expected {expected_uri:?}"
        ))
    }
}

/// The CA's verdict, then [`check_client_identity`].
#[derive(Debug)]
struct PinnedClient {
    inner: Arc<dyn ClientCertVerifier>,
    expected_uri: String,
}

impl ClientCertVerifier for PinnedClient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| warn!(error = %e, "tls client refused"))?;
        check_client_identity(end_entity, &self.expected_uri).map_err(|e| {
            warn!(error = %e, "tls client refused");
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    };

    fn ca() -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (p.self_signed(&key).unwrap(), key)
    }

    fn leaf(
        ca: &(rcgen::Certificate, KeyPair),
        uri: &str,
        eku: Vec<ExtendedKeyUsagePurpose>,
    ) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.extended_key_usages = eku;
        p.signed_by(&key, &ca.0, &ca.1).unwrap().der().to_vec()
    }

    #[test]
    fn the_client_identity_is_its_uri_and_client_auth() {
        let ca = ca();
        let want = "spiffe://memoh/instance/a/server";
        let good = leaf(&ca, want, vec![ExtendedKeyUsagePurpose::ClientAuth]);
        assert_eq!(check_client_identity(&good, want), Ok(()));
        let other = leaf(
            &ca,
            "spiffe://memoh/instance/b/server",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        assert!(check_client_identity(&other, want)
            .unwrap_err()
            .contains("not the expected"));
        let server_only = leaf(&ca, want, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        assert!(check_client_identity(&server_only, want)
            .unwrap_err()
            .contains("client authentication"));
        let no_eku = leaf(&ca, want, Vec::new());
        assert!(check_client_identity(&no_eku, want).is_err());
        assert!(check_client_identity(b"not a certificate", want).is_err());
    }
}
