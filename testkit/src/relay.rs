//! A relay for the `url` source's tests: an HTTPS server on 127.0.0.1 that serves one published
//! list (`allowsync::published`'s `json` format) the way a web server serves a file, with an
//! `ETag` and a 304 to a matching `If-None-Match`. Its certificate is signed by a CA minted for
//! this server alone, written to a PEM file for the source's `ca_file`: nothing else trusts it.
//!
//! Like the mock Chat API, the HTTP/1.1 side is written by hand (on `mock`'s request reader),
//! so that the faults can do what a framework would not: a body without `Content-Length` that
//! never ends, a 304 nobody asked for.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use ipnet::IpNet;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rcgen::{KeyUsagePurpose, SanType};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::mock::{chunked, next_fault, read_request};

/// The one path served.
pub const PATH: &str = "/allowlist/chat.json";
/// Where an endless body stops all the same (bounded traffic).
const ENDLESS_LIMIT: usize = 256 * 1024 * 1024;

/// Something to go wrong with the next answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayFault {
    /// This status with a short HTML body.
    Status(u16),
    /// 200 with this body, `Content-Length` and no `ETag`.
    Body(Vec<u8>),
    /// 200 with this body, chunked, without `Content-Length`.
    ChunkedBody(Vec<u8>),
    /// 200, chunked, a valid-looking list that goes on (up to 256 MiB): only a client that stops
    /// at its cap while it streams gets an answer before its timeout.
    Endless,
    /// 304 whatever the request said.
    NotModified,
}

/// A request as the relay saw it, with the status it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRequest {
    pub path: String,
    pub if_none_match: Option<String>,
    pub status: u16,
}

struct State {
    body: Vec<u8>,
    etag: String,
    version: u64,
    faults: VecDeque<(RelayFault, Option<usize>)>,
    requests: Vec<RelayRequest>,
    /// Set by [`RelayHandle::serve_file`]: the body is this file as it is at each request.
    file: Option<PathBuf>,
}

/// The relay server.
pub struct Relay;

impl Relay {
    /// Mints a CA and a certificate for 127.0.0.1 and localhost, writes the CA to
    /// `dir/relay-ca.pem`, binds 127.0.0.1:0 and serves in the background, an empty list
    /// until [`RelayHandle::publish`].
    pub async fn start(dir: &Path) -> std::io::Result<RelayHandle> {
        let (ca_pem, config) = tls();
        let ca_file = dir.join("relay-ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            body: Vec::new(),
            etag: String::new(),
            version: 0,
            faults: VecDeque::new(),
            requests: Vec::new(),
            file: None,
        }));
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let s = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((tcp, _)) = accepted {
                            let (acceptor, s) = (acceptor.clone(), Arc::clone(&s));
                            conns.spawn(async move {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    serve(tls, s).await;
                                }
                            });
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        let handle = RelayHandle { addr, ca_file, state, task };
        handle.publish(SystemTime::now(), &[]);
        Ok(handle)
    }
}

/// A CA's PEM and a server configuration whose certificate it signed.
fn tls() -> (String, rustls::ServerConfig) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "allowsync test relay CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    leaf.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .expect("server certificate");
    (ca_cert.pem(), config)
}

/// A running relay. Dropping it stops the server.
pub struct RelayHandle {
    addr: SocketAddr,
    ca_file: PathBuf,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `https://127.0.0.1:PORT/allowlist/chat.json`.
    pub fn url(&self) -> String {
        format!("https://{}{PATH}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the relay's certificate, as PEM.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Serves the list of `entries` (IPv4 and IPv6 mixed), as allowsync's publisher renders
    /// it, generated at `generated_at`, under a new `ETag`.
    pub fn publish(&self, generated_at: SystemTime, entries: &[&str]) {
        let nets: Vec<IpNet> = crate::set(entries);
        let v4: Vec<_> =
            nets.iter().filter_map(|n| if let IpNet::V4(n) = n { Some(*n) } else { None }).collect();
        let v6: Vec<_> =
            nets.iter().filter_map(|n| if let IpNet::V6(n) = n { Some(*n) } else { None }).collect();
        self.set_body(allowsync::published::render_json(generated_at, &v4, &v6));
    }

    /// Serves exactly `body`, under a new `ETag`.
    pub fn set_body(&self, body: impl Into<Vec<u8>>) {
        let mut st = self.state();
        st.version += 1;
        st.etag = format!("\"v{}\"", st.version);
        st.body = body.into();
    }

    /// Serves the file at `path` from now on, read at each request the way a web server
    /// serves a static file: its `ETag` comes from the modification time and the size, so a
    /// rewrite (a publisher's refresh too) is a new one. A missing file is a 404.
    pub fn serve_file(&self, path: &Path) {
        self.state().file = Some(path.to_owned());
    }

    /// The `ETag` served now.
    pub fn etag(&self) -> String {
        self.state().etag.clone()
    }

    /// Applies `fault` to every request until [`RelayHandle::clear_faults`].
    pub fn inject(&self, fault: RelayFault) {
        self.state().faults.push_back((fault, None));
    }

    /// Applies `fault` to the next `n` requests.
    pub fn inject_times(&self, fault: RelayFault, n: usize) {
        if n > 0 {
            self.state().faults.push_back((fault, Some(n)));
        }
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    pub fn requests(&self) -> Vec<RelayRequest> {
        self.state().requests.clone()
    }

    /// How many requests were answered with `status`.
    pub fn answered(&self, status: u16) -> usize {
        self.state().requests.iter().filter(|r| r.status == status).count()
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Answer {
    Bytes(Vec<u8>),
    Endless,
}

async fn serve<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(mut stream: S, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        let answer = answer(&state, &req.target, &req.method, &req.headers);
        let ok = match answer {
            Answer::Bytes(b) => stream.write_all(&b).await.is_ok(),
            Answer::Endless => endless(&mut stream).await,
        };
        if !ok || req.close {
            return;
        }
    }
}

fn answer(state: &Mutex<State>, target: &str, method: &str, headers: &[(String, String)]) -> Answer {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let fault = next_fault(&mut st.faults);
    if let Some(path) = st.file.clone() {
        match read_static(&path) {
            Some((body, etag)) => (st.body, st.etag) = (body, etag),
            None => (st.body, st.etag) = (Vec::new(), String::new()),
        }
    }
    let missing = st.file.is_some() && st.etag.is_empty();
    let if_none_match = headers.iter().find(|(k, _)| k == "if-none-match").map(|(_, v)| v.clone());
    let (status, answer) = match fault {
        _ if target != PATH || method != "GET" || missing => {
            (404, Answer::Bytes(response(404, &[], b"not found")))
        }
        Some(RelayFault::Status(s)) => (s, Answer::Bytes(response(s, &[], b"<html>error</html>"))),
        Some(RelayFault::Body(b)) => (200, Answer::Bytes(response(200, &[], &b))),
        Some(RelayFault::ChunkedBody(b)) => (200, Answer::Bytes(chunked(&b))),
        Some(RelayFault::Endless) => (200, Answer::Endless),
        Some(RelayFault::NotModified) => (304, Answer::Bytes(response(304, &[], b""))),
        None if if_none_match.as_deref() == Some(st.etag.as_str()) => {
            (304, Answer::Bytes(response(304, &[("ETag", &st.etag)], b"")))
        }
        None => (200, Answer::Bytes(response(200, &[("ETag", &st.etag)], &st.body))),
    };
    st.requests.push(RelayRequest { path: target.to_owned(), if_none_match, status });
    answer
}

/// A file's bytes and its `ETag`, nginx's shape (modification time and size in hex) but with
/// the time in nanoseconds, so that two writes within one second differ; `None` when it cannot
/// be read.
fn read_static(path: &Path) -> Option<(Vec<u8>, String)> {
    let body = std::fs::read(path).ok()?;
    let mtime = std::fs::metadata(path).ok()?.modified().ok()?;
    let nanos = mtime.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    let etag = format!("\"{nanos:x}-{:x}\"", body.len());
    Some((body, etag))
}

fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        404 => "Not Found",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    // A 304 has no body, and says nothing of its length.
    if status != 304 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A chunked list that does not end; `false` once the client has gone.
async fn endless<S: AsyncWrite + Unpin>(stream: &mut S) -> bool {
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = r#""192.0.2.1","#.repeat(1024);
    let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
    let opening = r#"{"version":1,"ipv4":["#;
    let first = format!("{:x}\r\n{opening}\r\n", opening.len());
    if stream.write_all(head).await.is_err() || stream.write_all(first.as_bytes()).await.is_err() {
        return false;
    }
    let mut sent = 0;
    while sent < ENDLESS_LIMIT {
        if stream.write_all(framed.as_bytes()).await.is_err() {
            return false;
        }
        sent += chunk.len();
    }
    false
}
