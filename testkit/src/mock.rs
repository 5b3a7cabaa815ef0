//! A mock of the Chat REST API's `GetIPList`, for the integration tests, the bench, the
//! `mock_chat_api` example and `make demo` (never in the daemon).
//!
//! It behaves like the real service where allowsync can tell: it checks the method, the query
//! string (`sdkappid`, `identifier`, `usersig`, `random` as a u32, `contenttype=json`,
//! `nettype` 0..=6) and the JSON body, verifies the usersig with [`usersig::verify`], and
//! answers HTTP 200 with the `ActionStatus` / `ErrorCode` envelope, using the reference's error
//! codes. On top of that a test can change the lists while it runs, count and inspect the
//! requests, and inject faults ([`Fault`]).
//!
//! The HTTP/1.1 server is written by hand on a `TcpListener` (keep-alive, `Content-Length`
//! bodies) rather than with a framework, because the faults need what a framework hides:
//! answers cut short, hung, or sent a byte at a time.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use allowsync::clock;
use allowsync::usersig::{self, UsersigError};

/// The only path served.
pub const PATH: &str = "/v4/ConfigSvc/GetIPList";
const MAX_HEAD: usize = 64 * 1024;
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// The mock's application and its initial lists.
#[derive(Clone)]
pub struct MockConfig {
    pub sdkappid: u64,
    /// The app administrator account.
    pub identifier: String,
    /// The app's secret key.
    pub key: String,
    /// Where to listen; `127.0.0.1:0` (any free port) when `None`.
    pub listen: Option<SocketAddr>,
    /// The list served per nettype; a nettype not in here gets an empty list.
    pub lists: BTreeMap<u8, Vec<String>>,
    /// When set, the lists are read from this file on every request (see [`parse_list_file`]),
    /// so that a running demo can be changed by editing it.
    pub list_file: Option<PathBuf>,
}

impl std::fmt::Debug for MockConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockConfig")
            .field("sdkappid", &self.sdkappid)
            .field("identifier", &self.identifier)
            .field("key", &"<redacted>")
            .field("listen", &self.listen)
            .field("lists", &self.lists)
            .field("list_file", &self.list_file)
            .finish()
    }
}

impl MockConfig {
    pub fn new(sdkappid: u64, identifier: impl Into<String>, key: impl Into<String>) -> Self {
        MockConfig {
            sdkappid,
            identifier: identifier.into(),
            key: key.into(),
            listen: None,
            lists: BTreeMap::new(),
            list_file: None,
        }
    }
}

/// Something to go wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status (502, 500…) with an HTML body, as a gateway would send.
    Status(u16),
    /// Read the request, never answer.
    Hang,
    /// Answer normally after this delay.
    Delay(Duration),
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// Announce a body longer than what is sent, then close the connection.
    Truncated,
    /// `ActionStatus: FAIL` with this error code.
    ErrorCode(i64),
    /// A successful answer with an empty `IPList`.
    EmptyList,
    /// A valid answer of more than 1 MiB, with `Content-Length`.
    Oversized,
    /// A valid answer of more than 1 MiB, chunked, without `Content-Length`.
    OversizedChunked,
    /// JSON with the wrong types (`ErrorCode` a string, `IPList` a string).
    WrongTypes,
    /// The normal list with these entries appended (to serve invalid entries).
    ExtraEntries(Vec<String>),
    /// The normal answer, one byte every interval.
    Dribble(Duration),
    /// HTTP 200 with exactly this body.
    Body(String),
    /// HTTP 200 with exactly this body, chunked, without `Content-Length` (so that only the
    /// client's running count can stop a huge one).
    ChunkedBody(String),
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The query string, decoded, in order.
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The `ErrorCode` answered, when the answer was an envelope.
    pub error_code: Option<i64>,
}

impl RecordedRequest {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct State {
    lists: BTreeMap<u8, Vec<String>>,
    /// Faults in order; `None` = until cleared, `Some(n)` = for the next n requests.
    faults: VecDeque<(Fault, Option<usize>)>,
    requests: Vec<RecordedRequest>,
    clock_offset: i64,
}

struct Shared {
    cfg: MockConfig,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The mock server.
pub struct MockChatApi;

impl MockChatApi {
    /// Binds (127.0.0.1:0 unless `cfg.listen` says otherwise) and serves in the background.
    pub async fn start(cfg: MockConfig) -> std::io::Result<MockHandle> {
        let listener = TcpListener::bind(cfg.listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lists: cfg.lists.clone(),
                faults: VecDeque::new(),
                requests: Vec::new(),
                clock_offset: 0,
            }),
            cfg,
        });
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the accept task drops it, which aborts them.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            conns.spawn(serve_connection(stream, Arc::clone(&s)));
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(MockHandle { addr, shared, task })
    }
}

/// A running mock. Dropping it stops the server.
pub struct MockHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl MockHandle {
    /// `http://127.0.0.1:PORT`, to use as an endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the list served for `nettype`.
    pub fn set_list(&self, nettype: u8, list: Vec<String>) {
        self.shared.state().lists.insert(nettype, list);
    }

    /// Applies `fault` to every request from now on, until [`MockHandle::clear_faults`].
    pub fn inject(&self, fault: Fault) {
        self.shared.state().faults.push_back((fault, None));
    }

    /// Applies `fault` to the next `n` requests only (`70001 once`: `inject_times(ErrorCode(70001), 1)`).
    pub fn inject_times(&self, fault: Fault, n: usize) {
        if n > 0 {
            self.shared.state().faults.push_back((fault, Some(n)));
        }
    }

    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// Makes the mock's clock run `secs` ahead (or behind) of the real one, to expire usersigs.
    pub fn set_clock_offset(&self, secs: i64) {
        self.shared.state().clock_offset = secs;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.state().requests.len()
    }

    /// Stops the server and closes every connection.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `nettype=entry,entry,…` specification (the example's `--list`).
pub fn parse_list_spec(spec: &str) -> Result<(u8, Vec<String>), String> {
    let (n, entries) =
        spec.split_once('=').ok_or_else(|| format!("`{spec}`: expected NETTYPE=ENTRY,ENTRY,…"))?;
    let n: u8 = n.trim().parse().map_err(|_| format!("`{spec}`: nettype must be 0..=6"))?;
    if n > 6 {
        return Err(format!("`{spec}`: nettype must be 0..=6"));
    }
    let list = entries.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
    Ok((n, list))
}

/// A list file: one `nettype=entry,entry,…` per line; blank lines and `#` comments ignored.
/// A nettype given on several lines gets all their entries.
pub fn parse_list_file(text: &str) -> Result<BTreeMap<u8, Vec<String>>, String> {
    let mut lists: BTreeMap<u8, Vec<String>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (n, list) = parse_list_spec(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        lists.entry(n).or_default().extend(list);
    }
    Ok(lists)
}

pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) body: Vec<u8>,
    pub(crate) close: bool,
    /// Every header, names in lower case.
    pub(crate) headers: Vec<(String, String)>,
}

/// Reads one request; `None` when the connection closed or sent something that is not HTTP.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_owned(), first.next()?.to_owned());
    let mut length = 0usize;
    let mut close = false;
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse().ok()?;
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            }
            headers.push((k, v.to_owned()));
        }
    }
    if length > MAX_REQUEST_BODY {
        return None;
    }
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some(Request { method, target, body, close, headers })
}

fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn envelope_ok(list: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({"ActionStatus": "OK", "ErrorCode": 0, "IPList": list})).expect("JSON")
}

fn envelope_fail(code: i64, info: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info})).expect("JSON")
}

fn oversized_body() -> Vec<u8> {
    let mut s = String::from(r#"{"ActionStatus":"OK","ErrorCode":0,"IPList":["#);
    while s.len() < 1024 * 1024 + 4096 {
        s.push_str(r#""192.0.2.1","#);
    }
    s.push_str(r#""192.0.2.1"]}"#);
    s.into_bytes()
}

/// A 200 answer with `body` in 16 KiB chunks.
pub(crate) fn chunked(body: &[u8]) -> Vec<u8> {
    let mut bytes =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for c in body.chunks(16 * 1024) {
        bytes.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        bytes.extend_from_slice(c);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        let close = req.close;
        match answer(&shared, req) {
            Answer::Bytes(bytes, delay) => {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::Dribble(bytes, every) => {
                for b in bytes {
                    tokio::time::sleep(every).await;
                    if stream.write_all(&[b]).await.is_err() {
                        return;
                    }
                }
            }
            Answer::Hang => std::future::pending::<()>().await,
            Answer::Close(bytes) => {
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
                return;
            }
        }
        if close {
            return;
        }
    }
}

enum Answer {
    /// Bytes to send, after an optional delay.
    Bytes(Vec<u8>, Option<Duration>),
    /// Bytes to send one at a time.
    Dribble(Vec<u8>, Duration),
    Hang,
    /// Bytes to send, then close the connection.
    Close(Vec<u8>),
}

/// The fault for the next answer from a queue of (fault, how many more times; `None`: until
/// cleared), counting it down.
pub(crate) fn next_fault<F: Clone>(faults: &mut VecDeque<(F, Option<usize>)>) -> Option<F> {
    let (f, left) = faults.front_mut()?;
    let f = f.clone();
    if let Some(n) = left {
        *n -= 1;
        if *n == 0 {
            faults.pop_front();
        }
    }
    Some(f)
}

fn answer(shared: &Shared, req: Request) -> Answer {
    let (path, query) = match req.target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (req.target.clone(), String::new()),
    };
    let query: Vec<(String, String)> = reqwest::Url::parse(&format!("http://mock/?{query}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let mut st = shared.state();
    let fault = next_fault(&mut st.faults);
    let mut recorded = RecordedRequest {
        method: req.method.clone(),
        path: path.clone(),
        query,
        body: req.body,
        error_code: None,
    };
    let ok_json = |code: &mut Option<i64>, list: &[String]| {
        *code = Some(0);
        response(200, "application/json", &envelope_ok(list))
    };
    let result = match fault {
        Some(Fault::Status(s)) => {
            Answer::Bytes(response(s, "text/html", format!("<html><body>{s}</body></html>").as_bytes()), None)
        }
        Some(Fault::Hang) => Answer::Hang,
        Some(Fault::Garbage) => {
            Answer::Bytes(response(200, "text/html", b"<html><body>Service Temporarily Unavailable"), None)
        }
        Some(Fault::Truncated) => {
            let body = envelope_ok(&["192.0.2.1".to_owned(), "198.51.100.0/24".to_owned()]);
            let mut bytes = response(200, "application/json", &body);
            bytes.truncate(bytes.len() - body.len() / 2);
            Answer::Close(bytes)
        }
        Some(Fault::ErrorCode(c)) => {
            recorded.error_code = Some(c);
            Answer::Bytes(response(200, "application/json", &envelope_fail(c, "injected error")), None)
        }
        Some(Fault::Oversized) => Answer::Bytes(response(200, "application/json", &oversized_body()), None),
        Some(Fault::OversizedChunked) => Answer::Bytes(chunked(&oversized_body()), None),
        Some(Fault::ChunkedBody(b)) => Answer::Bytes(chunked(b.as_bytes()), None),
        Some(Fault::WrongTypes) => Answer::Bytes(
            response(
                200,
                "application/json",
                br#"{"ActionStatus":"OK","ErrorCode":"0","IPList":"192.0.2.1"}"#,
            ),
            None,
        ),
        Some(Fault::Body(b)) => Answer::Bytes(response(200, "application/json", b.as_bytes()), None),
        other => {
            // A normal answer, possibly altered by the fault.
            let bytes = match check(shared, &st, &recorded) {
                Err(resp) => {
                    let (status, code, body) = resp;
                    recorded.error_code = code;
                    response(status, "application/json", &body)
                }
                Ok(nettype) => {
                    let mut list = match lists(shared, &st) {
                        Ok(l) => l.get(&nettype).cloned().unwrap_or_default(),
                        Err(e) => {
                            recorded.error_code = Some(70500);
                            let resp = response(200, "application/json", &envelope_fail(70500, &e));
                            st.requests.push(recorded);
                            return Answer::Bytes(resp, None);
                        }
                    };
                    match &other {
                        Some(Fault::EmptyList) => list.clear(),
                        Some(Fault::ExtraEntries(extra)) => list.extend(extra.iter().cloned()),
                        _ => {}
                    }
                    ok_json(&mut recorded.error_code, &list)
                }
            };
            match other {
                Some(Fault::Delay(d)) => Answer::Bytes(bytes, Some(d)),
                Some(Fault::Dribble(every)) => Answer::Dribble(bytes, every),
                _ => Answer::Bytes(bytes, None),
            }
        }
    };
    st.requests.push(recorded);
    result
}

fn lists(shared: &Shared, st: &State) -> Result<BTreeMap<u8, Vec<String>>, String> {
    match &shared.cfg.list_file {
        None => Ok(st.lists.clone()),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            parse_list_file(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// Checks a request as the service does; the nettype to serve, or the answer to give instead:
/// (HTTP status, ErrorCode, body).
fn check(shared: &Shared, st: &State, r: &RecordedRequest) -> Result<u8, (u16, Option<i64>, Vec<u8>)> {
    let fail = |code: i64, info: &str| (200, Some(code), envelope_fail(code, info));
    if r.path != PATH {
        return Err((404, None, b"not found".to_vec()));
    }
    if r.method != "POST" {
        return Err(fail(60002, "the REST API takes POST requests"));
    }
    if r.param("contenttype") != Some("json") {
        return Err(fail(60002, "contenttype must be json"));
    }
    if r.param("random").and_then(|v| v.parse::<u32>().ok()).is_none() {
        return Err(fail(60002, "random must be an unsigned 32-bit integer"));
    }
    let nettype = match r.param("nettype").and_then(|v| v.parse::<u8>().ok()) {
        Some(n) if n <= 6 => n,
        _ => return Err(fail(60002, "nettype must be 0..=6")),
    };
    if serde_json::from_slice::<Value>(&r.body).is_err() {
        return Err(fail(60003, "the body is not JSON"));
    }
    let sdkappid = match r.param("sdkappid").and_then(|v| v.parse::<u64>().ok()) {
        Some(s) if s == shared.cfg.sdkappid => s,
        _ => return Err(fail(60006, "invalid SDKAppID")),
    };
    let (Some(identifier), Some(sig)) = (r.param("identifier"), r.param("usersig")) else {
        return Err(fail(60004, "identifier and usersig are required"));
    };
    let now = clock::now_unix().saturating_add_signed(st.clock_offset);
    match usersig::verify(sig, sdkappid, identifier, &shared.cfg.key, now) {
        Ok(_) => {}
        Err(UsersigError::Expired { .. }) => return Err(fail(70001, "usersig expired")),
        Err(UsersigError::SdkappidMismatch { .. }) => return Err(fail(70014, "sdkappid mismatch")),
        Err(UsersigError::IdentifierMismatch { .. }) => return Err(fail(70013, "identifier mismatch")),
        Err(UsersigError::BadSignature) => return Err(fail(70009, "usersig verification failed")),
        Err(_) => return Err(fail(70003, "invalid usersig")),
    }
    if identifier != shared.cfg.identifier {
        return Err(fail(60010, "the identifier is not an app administrator"));
    }
    Ok(nettype)
}
