//! `allowsync fetch`: every source's normalized list, per nettype; no firewall is touched.
//! Exit 1 when a source failed.

use std::fmt::Write as _;

use allowsync::cli::Cli;
use allowsync::prefixes::AllowSet;
use allowsync::source::{Fetched, Sources};

use super::{CmdResult, Failure, exit, load, runtime};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    let sources = Sources::new(&cfg)?;
    let fetched = runtime()?.block_on(sources.fetch_all());
    print!("{}", render(&fetched));
    if fetched.iter().all(|f| f.result.is_ok()) { Ok(()) } else { Err(Failure::quiet(exit::FAILURE)) }
}

/// `allowsync fetch` output: per source and nettype, the normalized list (CIDR prefixes) and
/// counts.
fn render(fetched: &[Fetched]) -> String {
    let mut out = String::new();
    for f in fetched {
        let status = match &f.result {
            Ok(set) => {
                format!("ok, {} entries, {} skipped, {} prefixes", f.entries, f.skipped, set.to_nets().len())
            }
            Err(e) => format!("FAILED ({}): {e}", e.class()),
        };
        let _ = writeln!(out, "source {}: {status}", f.name);
        if let Some(p) = &f.published {
            let _ =
                writeln!(out, "  published list generated at {}", allowsync::clock::rfc3339(p.generated_at));
        }
        if f.nettypes.is_empty() {
            if let Ok(set) = &f.result {
                write_nets(&mut out, set, "  ");
            }
            continue;
        }
        for n in &f.nettypes {
            match &n.result {
                Ok(l) => {
                    let _ = writeln!(
                        out,
                        "  nettype {}: {} entries, {} skipped, {} prefixes",
                        n.nettype,
                        l.entries,
                        l.skipped,
                        l.list.to_nets().len()
                    );
                    write_nets(&mut out, &l.list, "    ");
                }
                Err(e) => {
                    let _ = writeln!(out, "  nettype {}: FAILED ({}): {e}", n.nettype, e.class());
                }
            }
        }
        if let (Ok(set), true) = (&f.result, f.nettypes.len() > 1) {
            let _ = writeln!(out, "  union: {} prefixes", set.to_nets().len());
            write_nets(&mut out, set, "    ");
        }
    }
    out
}

fn write_nets(out: &mut String, set: &AllowSet, indent: &str) {
    for n in set.to_nets() {
        let _ = writeln!(out, "{indent}{n}");
    }
}
