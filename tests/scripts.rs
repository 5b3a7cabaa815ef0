//! The shell scripts that `make test`, `make demo` and `make bench` run (tests/, scripts/, .ci/)
//! never pipe into a consumer that stops reading early (`head`, `grep -q`, `grep -m`,
//! `awk '... exit'`) under `pipefail`. The producer of such a pipe dies of SIGPIPE (exit 141)
//! whenever it is still writing when the consumer exits, which depends on timing and on how much
//! it writes: tests/packaging.sh failed that way on one machine in four (`ldconfig -p` piped into an `awk` that exits).

use std::path::Path;

/// The scripts checked: every shell script of the repository's own entry points.
fn scripts() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join(".ci/run")];
    for dir in ["tests", "scripts"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sh") {
                files.push(p);
            }
        }
    }
    files
}

/// The commands a line pipes into: what follows each `|` that is not `||`, outside single
/// quotes. Comment lines have none.
fn consumers(line: &str) -> Vec<&str> {
    if line.trim_start().starts_with('#') {
        return Vec::new();
    }
    let bytes = line.as_bytes();
    let (mut quoted, mut out) = (false, Vec::new());
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' => quoted = !quoted,
            b'|' if !quoted => {
                let double = bytes.get(i + 1) == Some(&b'|') || (i > 0 && bytes[i - 1] == b'|');
                if !double {
                    out.push(line[i + 1..].trim_start());
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether a command stops reading its input before its end.
fn exits_early(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.first().copied() {
        Some("head") => true,
        Some("grep" | "egrep" | "fgrep") => words[1..].iter().take_while(|w| w.starts_with('-')).any(|w| {
            ["--quiet", "--silent", "--max-count"].iter().any(|l| w.starts_with(l))
                || (!w.starts_with("--") && (w.contains('q') || w.contains('m')))
        }),
        Some("awk") => command.split('|').next().is_some_and(|c| c.contains("exit")),
        _ => false,
    }
}

#[test]
fn the_detector_finds_early_exiting_consumers() {
    for bad in [
        // Spelled with `concat!` so that this file itself holds no such pipe.
        concat!("path=$(ldconfig -p ", "|", " awk -v l=\"$lib\" '$1 == l { print $NF; exit }')"),
        concat!("pkg=$(dpkg -S \"$c\" 2>/dev/null ", "|", " head -1 | cut -d: -f1 || true)"),
        concat!("zcat x.gz ", "|", " grep -q '^\\.TH'"),
        concat!("rpm -qp --recommends \"$f\" ", "|", " grep -qx '(a or b)' && ok"),
        concat!("dpkg-query -W \"$p\" ", "|", " grep -m1 installed"),
    ] {
        assert!(consumers(bad).iter().any(|c| exits_early(c)), "{bad}");
    }
    for good in [
        "if grep -q x <<<\"$man\"; then",
        "readelf -d \"$BIN\" | sed -n 's/x/y/p'",
        "printf '%s\\n' \"$c\" | awk '{ print $1 }'",
        concat!("grep -nE 'a", "|", "head -1", "|", "grep -q' <<<\"$s\""),
        concat!("[ -n \"$x\" ] ", "||", " grep -q y file"),
        concat!("# ldconfig -p ", "|", " head"),
    ] {
        assert!(!consumers(good).iter().any(|c| exits_early(c)), "{good}");
    }
}

#[test]
fn no_script_pipes_into_an_early_exit_under_pipefail() {
    let mut found = Vec::new();
    for path in scripts() {
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("pipefail") {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if consumers(line).iter().any(|c| exits_early(c)) {
                found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "producer | early-exiting consumer under pipefail (SIGPIPE, exit 141, by timing); read a \
         variable instead (`grep -q x <<<\"$out\"`):\n{}",
        found.join("\n")
    );
}
