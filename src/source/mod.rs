//! TEMPORARY STUB of the source contract, replaced by the real module (branch `chat`).
use crate::config::{Config, SourceKind};
use crate::prefixes::AllowSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    RateLimited,
    Transient,
    UsersigExpired,
    Locked,
    Configuration,
    Network,
    InvalidResponse,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);
impl FetchError {
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Network
    }
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(String);

pub struct Fetched {
    pub name: String,
    pub result: Result<AllowSet, FetchError>,
    pub entries: usize,
    pub skipped: usize,
}

pub struct Sources {
    cfg: Config,
}

impl Sources {
    pub fn new(cfg: &Config) -> Result<Sources, SourceError> {
        Ok(Sources { cfg: cfg.clone() })
    }
    pub async fn fetch_all(&self) -> Vec<Fetched> {
        self.cfg
            .sources
            .iter()
            .map(|s| match &s.kind {
                SourceKind::Static(l) => Fetched {
                    name: s.name.clone(),
                    result: Ok(AllowSet::from_nets(l.iter().copied())),
                    entries: l.len(),
                    skipped: 0,
                },
                SourceKind::TencentChat(_) => Fetched {
                    name: s.name.clone(),
                    result: Err(FetchError("stub".into())),
                    entries: 0,
                    skipped: 0,
                },
            })
            .collect()
    }
}
