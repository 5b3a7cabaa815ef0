//! The four ways `backend.file` writes a list, and reading each back. The text formats
//! (`plain`, `haproxy`: one prefix per line; `nginx`: `allow PREFIX;` lines) start with two
//! comment lines, [`HEADER`] (what makes a file allowsync's) and its `generated_at`, and hold
//! nothing else: the operator writes `deny all;` after the `include`. `json` is
//! [`crate::published`].

use ipnet::IpNet;

use crate::config::FileFormat;
use crate::prefixes::AllowSet;
use crate::published;

/// The first line of every text format file allowsync writes.
pub(super) const HEADER: &str = "# managed by allowsync: rewritten at every change, hand edits are undone";

const GENERATED_AT: &str = "# generated_at: ";

/// A file's contents as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Parsed {
    pub(super) set: AllowSet,
    pub(super) generated_at: u64,
}

/// The bytes of `set` in `format`, generated at `now`.
pub(super) fn render(format: FileFormat, set: &AllowSet, now: u64) -> Vec<u8> {
    let nets = set.to_nets();
    let (line_start, line_end) = match format {
        FileFormat::Json => {
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for n in nets {
                match n {
                    IpNet::V4(n) => v4.push(n),
                    IpNet::V6(n) => v6.push(n),
                }
            }
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now);
            return published::render_json(at, &v4, &v6).into_bytes();
        }
        FileFormat::Plain | FileFormat::Haproxy => ("", ""),
        FileFormat::Nginx => ("allow ", ";"),
    };
    let mut out = format!("{HEADER}\n{GENERATED_AT}{}\n", crate::clock::rfc3339(now));
    for n in nets {
        out.push_str(&format!("{line_start}{n}{line_end}\n"));
    }
    out.into_bytes()
}

/// Reads a file of `format` back; `Err` says why it is not one allowsync wrote.
pub(super) fn parse(format: FileFormat, bytes: &[u8]) -> Result<Parsed, String> {
    if format == FileFormat::Json {
        let list = published::parse_json(bytes).map_err(|e| e.to_string())?;
        return Ok(Parsed {
            set: AllowSet::from_nets(list.nets()),
            generated_at: published::unix_seconds(list.generated_at),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("its first line is not `{HEADER}`"));
    }
    let generated_at = lines
        .next()
        .and_then(|l| l.strip_prefix(GENERATED_AT))
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .ok_or_else(|| format!("its second line is not `{GENERATED_AT}<RFC 3339 time>`"))?
        .as_secs();
    let mut nets = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let entry = match format {
            FileFormat::Nginx => line.strip_prefix("allow ").and_then(|l| l.strip_suffix(';')),
            _ => Some(line),
        };
        let net = entry.and_then(|e| e.parse::<IpNet>().ok()).ok_or_else(|| {
            format!("line {}, `{}`, is not {}", i + 3, line.escape_debug(), expected(format))
        })?;
        nets.push(net);
    }
    Ok(Parsed { set: AllowSet::from_nets(nets), generated_at })
}

fn expected(format: FileFormat) -> &'static str {
    match format {
        FileFormat::Nginx => "`allow PREFIX;`",
        _ => "a prefix",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_reads_back_what_it_wrote() {
        let set: AllowSet = allowsync_testkit::set(["203.0.113.0/24", "198.51.100.7", "2001:db8::/48"]);
        for format in [FileFormat::Json, FileFormat::Plain, FileFormat::Nginx, FileFormat::Haproxy] {
            let bytes = render(format, &set, 1_796_112_000);
            assert_eq!(parse(format, &bytes), Ok(Parsed { set: set.clone(), generated_at: 1_796_112_000 }));
        }
        // An empty list is still a file of its format.
        let empty = render(FileFormat::Nginx, &AllowSet::default(), 0);
        assert_eq!(parse(FileFormat::Nginx, &empty).unwrap().set, AllowSet::default());
    }

    #[test]
    fn what_allowsync_did_not_write_does_not_parse() {
        let nginx = |body: &str| {
            parse(
                FileFormat::Nginx,
                format!("{HEADER}\n{GENERATED_AT}2026-12-01T08:00:00Z\n{body}").as_bytes(),
            )
        };
        assert!(nginx("allow 10.0.0.0/8;\n# a comment\n").is_ok());
        assert!(nginx("deny all;\n").unwrap_err().contains("line 3, `deny all;`"));
        assert!(nginx("allow 10.0.0.0/8\n").is_err());
        assert!(parse(FileFormat::Plain, b"10.0.0.0/8\n").unwrap_err().contains("first line"));
        assert!(parse(FileFormat::Plain, format!("{HEADER}\n10.0.0.0/8\n").as_bytes()).is_err());
        assert!(parse(FileFormat::Json, b"{}").is_err());
        assert!(parse(FileFormat::Haproxy, &[0xff, 0xfe]).is_err());
    }
}
