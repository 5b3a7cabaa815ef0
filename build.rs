//! Generates the man page allowsync(8) and the bash, zsh and fish completions from the clap
//! definition in `src/cli.rs`, so that they can never disagree with the binary. Nothing here is
//! edited by hand or committed.
//!
//! Outputs go to `OUT_DIR` and are copied to `<target>/<profile>/assets/` (for the default
//! release build: `target/release/assets/`), a stable path the packaging metadata in
//! `Cargo.toml` refers to: `allowsync.8`, `allowsync.bash`, `_allowsync`, `allowsync.fish`.
//! `make man` (and `make deb`/`make rpm`) gzip the man page next to it.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, italic, roman};

// The command line exactly as the binary compiles it. `src/cli.rs` is self-contained (clap
// only) for this reason.
#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=build.rs");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut cmd = cli::Cli::command();
    cmd.build();

    fs::write(out.join("allowsync.8"), man_page(&cmd)?)?;
    for (shell, name) in
        [(Shell::Bash, "allowsync.bash"), (Shell::Zsh, "_allowsync"), (Shell::Fish, "allowsync.fish")]
    {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "allowsync", &mut buf);
        fs::write(out.join(name), buf)?;
    }

    // OUT_DIR is <target>/<profile>/build/allowsync-<hash>/out (with a target triple after
    // <target> when cross-compiling): three levels up is the profile directory, the one cargo-deb
    // means by `target/release/`.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let assets = profile_dir.join("assets");
        fs::create_dir_all(&assets)?;
        for name in ["allowsync.8", "allowsync.bash", "_allowsync", "allowsync.fish"] {
            copy_if_changed(&out.join(name), &assets.join(name))?;
        }
    }
    Ok(())
}

/// Copies unless the destination already holds the same bytes, so that `make` does not see a
/// fresh man page on every build.
fn copy_if_changed(from: &Path, to: &Path) -> io::Result<()> {
    let new = fs::read(from)?;
    if fs::read(to).ok().as_deref() != Some(new.as_slice()) {
        fs::write(to, new)?;
    }
    Ok(())
}

/// allowsync(8): clap_mangen's title, name, synopsis, description and global options, then the
/// commands with their own options, exit status, files and see also.
fn man_page(cmd: &clap::Command) -> io::Result<Vec<u8>> {
    let version = cmd.get_version().unwrap_or_default().to_string();
    // No date in the title: the page would change with every build and the package would not
    // be reproducible. The version says which release it documents.
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .date("")
        .source(format!("allowsync {version}"))
        .manual("System Administration");
    let mut buf = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    man.render_options_section(&mut buf)?;

    let mut roff = Roff::default();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let mut usage = vec![bold(format!("allowsync {}", sub.get_name()))];
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set() && !a.is_global_set()) {
            if let Some(long) = arg.get_long() {
                if matches!(long, "help" | "version") {
                    continue;
                }
                let required = arg.is_required_set();
                usage.push(roman(if required { " " } else { " [" }));
                usage.push(bold(format!("--{long}")));
                if let Some(names) = arg.get_value_names().filter(|_| arg.get_action().takes_values()) {
                    usage.push(roman(" "));
                    usage.push(italic(names.join(" ")));
                }
                if !required {
                    usage.push(roman("]"));
                }
            }
        }
        roff.control("TP", []);
        roff.text(usage);
        let about = sub.get_long_about().or(sub.get_about()).map(|s| s.to_string()).unwrap_or_default();
        roff.text([roman(about)]);
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set() && !a.is_global_set()) {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let help = arg.get_long_help().or(arg.get_help()).map(|s| s.to_string()).unwrap_or_default();
            roff.control("RS", []);
            roff.control("TP", []);
            roff.text([bold(format!("--{long}"))]);
            roff.text([roman(help)]);
            roff.control("RE", []);
        }
    }

    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in [
        ("0", "Success."),
        ("1", "Runtime failure: network, kernel, state file, or a source failed."),
        ("2", "Usage or configuration error (the message names the file, line, column and key)."),
        ("3", "Refused by a safety guard: an empty allowlist, or a mass removal (see once --force)."),
    ] {
        roff.control("TP", []);
        roff.text([bold(code)]);
        roff.text([roman(meaning)]);
    }

    roff.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in [
        ("ALLOWSYNC_CONFIG", "The configuration file, when -c is not given."),
        ("RUST_LOG", "Overrides log.level, e.g. allowsync=debug."),
    ] {
        roff.control("TP", []);
        roff.text([bold(name)]);
        roff.text([roman(meaning)]);
    }

    roff.control("SH", ["FILES"]);
    for (path, meaning) in [
        (
            cli::DEFAULT_PATH,
            "The configuration (YAML), mode 0640, group allowsync. `allowsync check-config` validates it; \
             `systemctl reload allowsync` applies it.",
        ),
        (
            "/etc/allowsync/chat-sgp.key",
            "The Chat app's secret key, mode 0600, owner root. The unit hands it to the daemon with \
             LoadCredential= as /run/credentials/allowsync.service/chat-sgp.key.",
        ),
        (
            "/var/lib/allowsync/state.json",
            "The state file: the last good allowlist per source, restored into the kernel at start \
             before any fetch. Written atomically, mode 0600.",
        ),
        (
            "/var/lib/allowsync/state.json.lock",
            "Held by the allowsync process that manages this state (one per state file).",
        ),
        (
            "/usr/lib/systemd/system/allowsync.service",
            "The systemd unit (Type=notify, watchdog, SIGHUP reload). Installed disabled.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(path)]);
        roff.text([roman(meaning)]);
    }

    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("nft"),
        roman("(8), "),
        bold("ipset"),
        roman("(8), "),
        bold("systemd.exec"),
        roman("(5), "),
        bold("systemd-creds"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1)"),
    ]);
    roff.to_writer(&mut buf)?;
    Ok(buf)
}
