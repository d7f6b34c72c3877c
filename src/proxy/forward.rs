//! The pooled upstream client and the classification of its failures, which decides
//! whether a request's outcome is known (SPEC §3 step 8).

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::pool::Pool;
use crate::body::Body;
use crate::config::UpstreamConfig;
use crate::error::ProxyError;

/// How an exchange with the upstream failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The request never left: nothing ran upstream.
    Refused(String),
    /// The request was sent and the connection broke: the outcome is unknown.
    Reset(String),
    /// `upstream.timeout` passed: the outcome is unknown.
    Timeout,
}

impl UpstreamFailure {
    pub fn outcome_unknown(&self) -> bool {
        !matches!(self, UpstreamFailure::Refused(_))
    }
}

impl From<UpstreamFailure> for ProxyError {
    fn from(f: UpstreamFailure) -> Self {
        match f {
            UpstreamFailure::Refused(why) | UpstreamFailure::Reset(why) => {
                ProxyError::UpstreamUnavailable(why)
            }
            UpstreamFailure::Timeout => ProxyError::UpstreamTimeout,
        }
    }
}

/// One serving thread's way to the upstream: its own connections (see [`Pool`]).
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
    pub base: Uri,
    pub timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = tls_config(config)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let pool = Pool::new(https, config.url.clone(), Duration::from_secs(60));
        Ok(Upstream {
            pool: Arc::new(pool),
            base: config.url.clone(),
            timeout: config.timeout,
        })
    }

    /// Sends a request whose head was already rewritten for the upstream and waits for
    /// the response head, at most `upstream.timeout`.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamFailure> {
        match tokio::time::timeout(self.timeout, self.pool.send(req)).await {
            Err(_) => Err(UpstreamFailure::Timeout),
            Ok(result) => result,
        }
    }
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The webpki roots plus every certificate in `ca_file`; also run by `check`.
pub fn load_roots(ca_file: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", ca_file.display());
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| fail(&e))?;
    let mut added = 0;
    for cert in certs {
        roots
            .add(cert.map_err(|e| fail(&e))?)
            .map_err(|e| fail(&e))?;
        added += 1;
    }
    if added == 0 {
        return Err(fail(&"no certificate found"));
    }
    Ok(roots)
}

fn tls_config(config: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    let roots = match &config.ca_file {
        Some(path) => load_roots(path).map_err(|e| format!("upstream.ca_file {e}"))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN (h2, http/1.1) is set by the connector builder.
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}
