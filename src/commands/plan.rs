//! `allowsync plan`: fetch and print what a sync would add and remove per family, and the
//! guards' verdict; change nothing. Exits as `once` would: 3 when the verdict is a refusal,
//! else 1 when a source failed.

use std::fmt::Write as _;

use allowsync::cli::Cli;
use allowsync::engine::Verdict;
use allowsync::prefixes::{Addr, Delta, Range};
use allowsync::syncer::Syncer;

use super::{CmdResult, exit, exit_with, load, runtime};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    let mut syncer = Syncer::new(cfg, false)?;
    let (desired, plan) = runtime()?.block_on(syncer.plan())?;
    let mut out = String::new();
    for s in &desired.sources {
        writeln!(out, "source {s}")?;
    }
    family(&mut out, "ipv4", &plan.diff.v4)?;
    family(&mut out, "ipv6", &plan.diff.v6)?;
    let safety = &syncer.config().safety;
    writeln!(
        out,
        "widening: +{} IPv4 addresses (max_added_addresses_v4 {}), +{} IPv6 /64 networks (max_added_addresses_v6 {})",
        plan.widening.v4_addresses,
        safety.max_added_addresses_v4,
        plan.widening.v6_nets,
        safety.max_added_addresses_v6
    )?;
    // As `once` would exit: 3 refused, else 1 when a source failed, else 0.
    let source_failed = !desired.all_fresh();
    let ok = if source_failed { exit::FAILURE } else { 0 };
    let code = match &plan.verdict {
        Verdict::InSync => {
            writeln!(out, "verdict: in sync, nothing to do")?;
            ok
        }
        Verdict::Apply => {
            writeln!(
                out,
                "verdict: would apply {} additions and {} removals",
                plan.diff.added(),
                plan.diff.removed()
            )?;
            ok
        }
        Verdict::Refused(r) => {
            writeln!(out, "verdict: REFUSED: {r}")?;
            exit::REFUSED
        }
    };
    print!("{out}");
    exit_with(code)
}

fn family<A: Addr>(out: &mut String, name: &str, d: &Delta<A>) -> std::fmt::Result {
    if d.is_empty() {
        return writeln!(out, "{name}: no change");
    }
    writeln!(out, "{name}: +{} -{}", d.add.len(), d.remove.len())?;
    let line = |out: &mut String, sign: char, r: &Range<A>| writeln!(out, "  {sign} {r}");
    for r in &d.remove {
        line(out, '-', r)?;
    }
    for r in &d.add {
        line(out, '+', r)?;
    }
    Ok(())
}
