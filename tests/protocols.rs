//! HTTP/2 by prior knowledge (h2c) on plain TCP, and TLS termination with ALPN offering
//! h2 and http/1.1, with a certificate generated here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::net::TcpStream;

const BASE: &str = r#"
[upstream]
url = "{upstream}"
"#;

async fn h2_get<IO>(io: IO, authority: &str, path: &str) -> (StatusCode, Version, Bytes)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::post(format!("https://{authority}{path}"))
        .body(Full::new(Bytes::from_static(b"over h2")))
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 request");
    let status = resp.status();
    let version = resp.version();
    (
        status,
        version,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn h2c_prior_knowledge_works_on_plain_tcp() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(BASE, &upstream.url()).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (status, version, body) = h2_get(tcp, &proxy.addr.to_string(), "/h2c?q=1").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(version, Version::HTTP_2);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["uri"], "/h2c?q=1");
    assert_eq!(doc["body"], "over h2");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

struct TlsSetup {
    _dir: tempfile::TempDir,
    cert_path: std::path::PathBuf,
    connector: tokio_rustls::TlsConnector,
    config: idemgate::config::Config,
}

fn tls_setup(upstream: &str, alpn: &[&[u8]]) -> TlsSetup {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("tls.crt");
    let key_path = dir.path().join("tls.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let toml = format!(
        "{BASE}\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    let config = config(&toml, upstream);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(certified.cert.der().to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsSetup {
        _dir: dir,
        cert_path,
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        config,
    }
}

impl TlsSetup {
    async fn connect(
        &self,
        addr: std::net::SocketAddr,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        self.connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }
}

#[tokio::test]
async fn tls_termination_negotiates_h2_by_alpn() {
    let upstream = FakeUpstream::echo().await;
    let setup = tls_setup(&upstream.url(), &[b"h2", b"http/1.1"]);
    let proxy = TestProxy::with_config(setup.config.clone()).await;
    let tls = setup.connect(proxy.addr).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, version, body) = h2_get(tls, "localhost", "/secure").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(version, Version::HTTP_2);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["uri"], "/secure");
    assert_eq!(doc["body"], "over h2");
    proxy.shutdown().await;
}

#[tokio::test]
async fn tls_termination_serves_http1_and_sets_forwarded_proto() {
    let upstream = FakeUpstream::buffered(|seen, _| async move {
        let proto = seen
            .headers
            .get("x-forwarded-proto")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        http::Response::new(idemgate::body::full(proto))
    })
    .await;
    let setup = tls_setup(&upstream.url(), &[b"http/1.1"]);
    let proxy = TestProxy::with_config(setup.config.clone()).await;
    let tls = setup.connect(proxy.addr).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/proto")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from("https")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn https_upstream_is_reached_with_ca_file_and_refused_without_it() {
    // The https upstream is idemgate itself terminating TLS in front of an echo server.
    let echo = FakeUpstream::echo().await;
    let setup = tls_setup(&echo.url(), &[b"h2"]);
    let https = TestProxy::with_config(setup.config.clone()).await;
    let url = format!("https://localhost:{}", https.addr.port());

    let trusted = format!(
        "[upstream]\nurl = \"{{upstream}}\"\nca_file = {:?}\n",
        setup.cert_path.display().to_string()
    );
    let proxy = TestProxy::start(&trusted, &url).await;
    let got = Client::new()
        .post(&proxy.url("/over-tls?x=1"), &[], "secret payload")
        .await;
    assert_eq!(got.status, StatusCode::CREATED);
    assert_eq!(got.json()["uri"], "/over-tls?x=1");
    assert_eq!(got.json()["body"], "secret payload");
    proxy.shutdown().await;

    let untrusted = TestProxy::start(BASE, &url).await;
    let refused = Client::new().get(&untrusted.url("/over-tls")).await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_GATEWAY,
        "a certificate outside the roots must fail"
    );
    assert_eq!(refused.code(), "upstream_unavailable");
    untrusted.shutdown().await;
    assert_eq!(echo.calls(), 1);
    https.shutdown().await;
}
