//! A stand-alone mock of the Chat REST API's GetIPList, for `make demo` and manual tests:
//!
//! ```text
//! cargo run --example mock_chat_api -- --listen 127.0.0.1:8089 \
//!     --sdkappid 1400000000 --identifier administrator --key-file config/demo.key \
//!     --list 5=203.0.113.0/24,198.51.100.7 --list 6=2001:db8::/48
//! ```
//!
//! To change the lists while it runs, use `--list-file FILE` instead of `--list`: the file
//! (one `NETTYPE=ENTRY,ENTRY,…` per line, `#` comments) is read again on every request. An
//! unreadable or malformed file makes the mock answer error 70500, like a server fault.
//!
//! With `--record FILE`, every usersig it was sent and the `TLS.sig` inside each are appended
//! to FILE, one per line, when it stops (SIGINT or SIGTERM): for tests that check that no log
//! holds them.
//!
//! Prints `listening on http://ADDR` on stdout once it accepts connections; runs until
//! SIGINT or SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use allowsync_testkit::mock::{MockChatApi, MockConfig, parse_list_file, parse_list_spec};
use clap::Parser;

#[derive(Parser)]
#[command(about = "A mock Tencent Cloud Chat GetIPList server")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 1400000000)]
    sdkappid: u64,
    /// The app administrator account.
    #[arg(long, default_value = "administrator")]
    identifier: String,
    /// File holding the app's secret key (surrounding whitespace ignored).
    #[arg(long)]
    key_file: PathBuf,
    /// A served list, `NETTYPE=ENTRY,ENTRY,…`; repeatable.
    #[arg(long = "list", value_parser = parse_list_spec)]
    lists: Vec<(u8, Vec<String>)>,
    /// Serve the lists of this file, re-read on every request (overrides --list).
    #[arg(long)]
    list_file: Option<PathBuf>,
    /// On exit, append every usersig received and its TLS.sig to this file, one per line.
    #[arg(long)]
    record: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key = std::fs::read_to_string(&args.key_file)?.trim().to_owned();
    anyhow::ensure!(!key.is_empty(), "{} is empty", args.key_file.display());
    if let Some(f) = &args.list_file {
        // Fail at start on a malformed file rather than on the first request.
        parse_list_file(&std::fs::read_to_string(f)?).map_err(anyhow::Error::msg)?;
    }
    let mut cfg = MockConfig::new(args.sdkappid, args.identifier, key);
    cfg.listen = Some(args.listen);
    cfg.list_file = args.list_file;
    for (n, list) in args.lists {
        cfg.lists.entry(n).or_default().extend(list);
    }
    let mock = MockChatApi::start(cfg).await?;
    println!("listening on {}", mock.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    if let Some(path) = &args.record {
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        for sig in mock.requests().iter().filter_map(|r| r.param("usersig")) {
            writeln!(out, "{sig}")?;
            if let Ok(doc) = allowsync::usersig::decode(sig) {
                writeln!(out, "{}", doc.sig)?;
            }
        }
    }
    mock.shutdown().await;
    Ok(())
}
