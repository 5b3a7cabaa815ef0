//! What the HTTP sources share: the client (extra CAs from `ca_file`, no redirects) and a body
//! read that stops at a cap while it streams.

use std::path::PathBuf;
use std::time::Duration;

use super::{FetchError, SourceError};

/// A client trusting the system store plus every CA in `ca_files`, that never follows a
/// redirect: a Chat redirect would carry the usersig elsewhere, a `url` one could leave
/// https:// (configure the final URL instead).
pub(super) fn client<'a>(
    connect_timeout: Duration,
    ca_files: impl IntoIterator<Item = &'a PathBuf>,
) -> Result<reqwest::Client, SourceError> {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("allowsync/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(90));
    let mut seen = std::collections::BTreeSet::new();
    for path in ca_files {
        if !seen.insert(path.clone()) {
            continue;
        }
        let pem =
            std::fs::read(path).map_err(|cause| SourceError::CaFileRead { path: path.clone(), cause })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| SourceError::CaFile { path: path.clone(), message: e.to_string() })?;
        if certs.is_empty() {
            return Err(SourceError::CaFile { path: path.clone(), message: "no certificate found".into() });
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| SourceError::Client(e.to_string()))
}

/// The body of `resp`, at most `limit` bytes: a larger one is [`FetchError::BodyTooLarge`],
/// found from `Content-Length` before reading or, for a chunked or lying answer, as soon as
/// the running count passes the cap, so that no more than `limit` bytes are ever buffered.
pub(super) async fn read_capped(
    mut resp: reqwest::Response,
    limit: usize,
    net_err: impl Fn(reqwest::Error) -> FetchError,
) -> Result<Vec<u8>, FetchError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(FetchError::BodyTooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(&net_err)? {
        if body.len() + chunk.len() > limit {
            return Err(FetchError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
