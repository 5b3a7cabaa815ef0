//! `allowsync check-config`: validate the configuration and print a summary of it (never the
//! secret key). Exit 2 when it is invalid.

use allowsync::cli::Cli;
use allowsync::config::{BackendConfig, Config, Enforce, EnforceScope, SourceKind, fmt_duration};

use super::{CmdResult, Failure};

pub fn run(cli: &Cli) -> CmdResult {
    // No logging: warnings go to stderr as such, the summary to stdout.
    let cfg = Config::load(&cli.config).map_err(Failure::usage)?;
    for w in &cfg.warnings {
        eprintln!("warning: {w}");
    }
    println!("{}", summary(&cfg));
    Ok(())
}

/// A human summary of `cfg`: sources, nettypes, backend and sets. Never the key.
fn summary(cfg: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "configuration {} is valid", cfg.path.display());
    let _ = writeln!(
        s,
        "  interval {} (+ up to {} jitter)",
        fmt_duration(cfg.interval),
        fmt_duration(cfg.jitter)
    );
    let _ = writeln!(s, "  state file {}", cfg.state_file.display());
    let _ = writeln!(s, "  sources:");
    for src in &cfg.sources {
        match &src.kind {
            SourceKind::TencentChat(c) => {
                let nettypes: Vec<String> = c.nettypes.iter().map(u8::to_string).collect();
                let _ = writeln!(
                    s,
                    "    {}: tencent_chat sdkappid {} as {} via {}, nettypes [{}], key from {}",
                    src.name,
                    c.sdkappid,
                    c.identifier,
                    c.endpoints.join(" then "),
                    nettypes.join(", "),
                    c.secret_key.origin()
                );
            }
            SourceKind::Static(list) => {
                let _ = writeln!(s, "    {}: static, {} entries", src.name, list.len());
            }
            SourceKind::Url(u) => {
                let ca = u.ca_file.as_ref().map(|p| format!(", CA {}", p.display())).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "    {}: url {}{ca}, max_age {}, max_bytes {}",
                    src.name,
                    u.url,
                    fmt_duration(u.max_age),
                    u.max_bytes
                );
            }
        }
    }
    let backend = match &cfg.backend {
        BackendConfig::Nftables(n) => format!(
            "nftables: own table inet {}, {} and {}{}",
            n.table,
            n.set_object(false),
            n.set_object(true),
            enforce_text(&n.enforce)
        ),
        BackendConfig::Ipset(i) => {
            format!(
                "ipset: sets {} and {}, maxelem {}{}",
                i.set_v4,
                i.set_v6,
                i.maxelem,
                enforce_text(&i.enforce)
            )
        }
        BackendConfig::DryRun => "dry_run: nothing is written to the firewall".into(),
        BackendConfig::File(f) => format!(
            "file: {} as {}, refreshed every {}, on_change {}",
            f.path.display(),
            f.format.as_str(),
            allowsync::config::fmt_duration(f.refresh),
            f.on_change.as_ref().map_or("none".into(), |a| format!(
                "{a:?} (timeout {})",
                allowsync::config::fmt_duration(f.on_change_timeout)
            ))
        ),
    };
    let _ = writeln!(s, "  backend {backend}");
    let sf = &cfg.safety;
    let _ = writeln!(
        s,
        "  safety: allow_empty {}, max_removal_percent {}, min_prefix_v4 {}, min_prefix_v6 {}, \
         max_added_addresses_v4 {}, max_added_addresses_v6 {} (/64s)",
        sf.allow_empty,
        sf.max_removal_percent,
        sf.min_prefix_v4,
        sf.min_prefix_v6,
        sf.max_added_addresses_v4,
        sf.max_added_addresses_v6
    );
    let _ = writeln!(s, "  log: {:?} at {}", cfg.log.format, cfg.log.level);
    let m = &cfg.metrics;
    let listen = m.listen.map_or("no listener".into(), |a| format!("GET /metrics and /healthz on {a}"));
    let textfile = m.textfile.as_ref().map_or("no textfile".into(), |t| format!("textfile {}", t.display()));
    let _ = write!(s, "  metrics: {listen}, {textfile}");
    s
}

fn enforce_text(e: &Option<Enforce>) -> String {
    match e {
        None => ", not enforcing (add your own rule)".into(),
        Some(e) => {
            let scope = match e.scope {
                EnforceScope::Host => "host: every packet addressed to this host, DNATed ones included",
                EnforceScope::Local => "local: local sockets only, not DNATed ports",
            };
            format!(", enforcing tcp {:?} udp {:?} (scope {scope})", e.tcp_ports, e.udp_ports)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_summary_never_shows_the_key() {
        let text = "sources:\n  - name: sgp\n    tencent_chat:\n      region: singapore\n      sdkappid: 1400000000\n      identifier: administrator\n      secret_key: s3cr3t-value\n";
        let cfg = allowsync::config::parse(text, Path::new("/etc/allowsync/config.yaml"))
            .and_then(allowsync::config::Parsed::resolve)
            .unwrap();
        let shown = summary(&cfg);
        assert!(shown.contains("sgp: tencent_chat sdkappid 1400000000 as administrator"), "{shown}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
    }
}
