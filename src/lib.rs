//! allowsync keeps a firewall allowlist in step with the webhook egress addresses that Tencent
//! Cloud Chat publishes through its `GetIPList` REST API.
//!
//! The flow of one sync, module by module:
//!
//! ```text
//! source/ (GetIPList per app and nettype, static entries)
//!   -> prefixes (validate, both families, aggregate)      -> the desired set
//!      admission (refuse what must never be allowed)
//!   -> backend/ (read the live set, diff, apply in one transaction)
//!   -> state (last good list, written atomically)
//! ```
//!
//! [`usersig`] mints the TLSSigAPIv2 usersig that authenticates GetIPList calls.
//!
//! [`config`] reads the YAML file, [`cli`] defines the command line; the binary in `main.rs`
//! only wires them together.

#![deny(unsafe_code)]

pub mod admission;
pub mod backend;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod logging;
pub mod prefixes;
pub mod source;
pub mod state;
pub mod syncer;
pub mod usersig;
