//! Log output: `text` (stderr), `json` (one object per line on stderr) or `journald` (native
//! journal fields, falling back to text when there is no journal socket). The level comes from
//! the configuration; `RUST_LOG` overrides it.
//!
//! Text from outside (API entries, the server's `ErrorInfo`) reaches a log line or an error
//! message only through `Untrusted`: escaped and capped, whatever the format.

//!
//! Under systemd, stderr is usually a stream to journald, which stores every line at the unit's
//! default priority (info) unless the line starts with an sd-daemon `<N>` prefix. So when
//! `JOURNAL_STREAM` names stderr (its `device:inode`), each text or JSON line gets the prefix of
//! its level, and `journalctl -p warning` shows allowsync's warnings and errors. journald strips
//! the prefix; on a terminal or in a file there is none.

use std::fmt::{self, Write as _};
use std::io::{self, Write};

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Returns a warning to log once it is in place (journald
/// unavailable). Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init(cfg: &LogConfig) -> Option<String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // Colours only for a person at a terminal, never into the journal or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = Prioritized { inner: std::io::stderr, enabled: stderr_is_journal() };
    let text = || tracing_subscriber::fmt::layer().with_writer(stderr).with_target(false).with_ansi(ansi);
    let mut warning = None;
    let result = match cfg.format {
        LogFormat::Text => tracing_subscriber::registry().with(filter()).with(text()).try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter())
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    // A source's fetch logs inside its span (`fetch`, with `source` and
                    // `nettype`): the object's `span` carries them.
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(stderr),
            )
            .try_init(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => tracing_subscriber::registry()
                .with(filter())
                .with(layer.with_syslog_identifier("allowsync".into()))
                .try_init(),
            Err(e) => {
                warning = Some(format!(
                    "log.format is journald but the journal is not reachable ({e}): logging text to stderr"
                ));
                tracing_subscriber::registry().with(filter()).with(text()).try_init()
            }
        },
    };
    // Already initialized (a test, or a reload): keep the first one.
    let _ = result;
    warning
}

/// The longest text from outside shown anywhere, in characters, quotes included.
pub(crate) const MAX_UNTRUSTED: usize = 256;

/// Text from outside as it may be shown: in double quotes, every control, format, separator
/// and other non-printable character escaped the way `{:?}` does (`\n`, `\r`, `\u{1b}`, …),
/// cut to [`MAX_UNTRUSTED`] characters with a `…` where it was cut. Whatever the server sends,
/// it cannot end a log line early, start a forged one or reach the terminal as an escape
/// sequence.
pub(crate) struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Two quotes and the ellipsis.
        let mut budget = MAX_UNTRUSTED - 3;
        f.write_char('"')?;
        for c in self.0.chars() {
            // `'` needs no escape inside double quotes.
            let escaped = c.escape_debug();
            let n = if c == '\'' { 1 } else { escaped.len() };
            if n > budget {
                f.write_char('…')?;
                break;
            }
            budget -= n;
            if c == '\'' { f.write_char(c)? } else { write!(f, "{escaped}")? }
        }
        f.write_char('"')
    }
}

/// True when `JOURNAL_STREAM` (`device:inode`, set by systemd) is the stream stderr is.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let meta =
        std::io::stderr().as_fd().try_clone_to_owned().map(std::fs::File::from).and_then(|f| f.metadata());
    meta.is_ok_and(|m| journal_stream_is(&value.to_string_lossy(), m.dev(), m.ino()))
}

fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    let parsed =
        value.split_once(':').and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)));
    parsed == Some((dev, ino))
}

/// The sd-daemon prefix of a level (syslog priorities: err, warning, info, debug).
fn prefix(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        Level::DEBUG | Level::TRACE => b"<7>",
    }
}

/// A [`MakeWriter`] that, when `enabled`, starts each event's line with its level's prefix.
#[derive(Clone, Copy)]
struct Prioritized<M> {
    inner: M,
    enabled: bool,
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Prioritized<M> {
    type Writer = PrefixedWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        PrefixedWriter { inner: self.inner.make_writer(), prefix: None }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        let prefix = self.enabled.then(|| prefix(meta.level()));
        PrefixedWriter { inner: self.inner.make_writer_for(meta), prefix }
    }
}

/// Writes `prefix` in front of the first write (fmt writes one event with one `write_all`),
/// in the same write, so that lines of concurrent events cannot interleave with it.
struct PrefixedWriter<W> {
    inner: W,
    prefix: Option<&'static [u8]>,
}

impl<W: Write> Write for PrefixedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.prefix.take() {
            Some(p) => {
                self.inner.write_all(&[p, buf].concat())?;
                Ok(buf.len())
            }
            None => self.inner.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_quoted_escaped_and_capped() {
        let forged =
            "10.0.0.1\n2026-01-01T00:00:00Z  INFO sync outcome=\"applied\"\r\u{1b}[2J\u{85}\u{2028}\u{202e}";
        let shown = Untrusted(forged).to_string();
        assert_eq!(
            shown,
            r#""10.0.0.1\n2026-01-01T00:00:00Z  INFO sync outcome=\"applied\"\r\u{1b}[2J\u{85}\u{2028}\u{202e}""#
        );
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert_eq!(Untrusted("it's").to_string(), r#""it's""#);
        assert_eq!(Untrusted("").to_string(), r#""""#);

        let long = "a".repeat(1000);
        let shown = Untrusted(&long).to_string();
        assert_eq!(shown.chars().count(), MAX_UNTRUSTED);
        assert!(shown.ends_with("a…\""), "{shown}");
        // A text that fits is shown whole; an escape is never cut in half.
        let fits = "b".repeat(MAX_UNTRUSTED - 3);
        assert_eq!(Untrusted(&fits).to_string(), format!("\"{fits}\""));
        let escapes = "\u{1b}".repeat(100);
        let shown = Untrusted(&escapes).to_string();
        assert!(shown.chars().count() <= MAX_UNTRUSTED);
        assert!(shown.ends_with("\\u{1b}…\""), "{shown}");
    }

    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(enabled: bool, json: bool) -> Vec<String> {
        let buf = Buf::default();
        let sink = buf.clone();
        let writer = Prioritized { inner: move || sink.clone(), enabled };
        let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false);
        let emit = || {
            tracing::error!(key = 1, "an error");
            tracing::warn!("a warning");
            tracing::info!("news");
            tracing::debug!("detail");
        };
        let filter = EnvFilter::new("debug");
        if json {
            tracing::subscriber::with_default(
                tracing_subscriber::registry().with(filter).with(layer.json()),
                emit,
            );
        } else {
            tracing::subscriber::with_default(tracing_subscriber::registry().with(filter).with(layer), emit);
        }
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        out.lines().map(str::to_owned).collect()
    }

    #[test]
    fn into_the_journal_each_line_starts_with_its_priority() {
        for json in [false, true] {
            let got = lines(true, json);
            let prefixes: Vec<&str> = got.iter().map(|l| &l[..3]).collect();
            assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{got:?}");
            assert!(got[0].contains("an error") && got[1].contains("a warning"), "{got:?}");
            if json {
                assert!(got.iter().all(|l| l[3..].starts_with('{')), "JSON after the prefix: {got:?}");
            }
        }
    }

    #[test]
    fn elsewhere_no_line_has_a_prefix() {
        let got = lines(false, false);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|l| !l.starts_with('<')), "{got:?}");
    }

    #[test]
    fn journal_stream_must_name_this_device_and_inode() {
        assert!(journal_stream_is("8:123456", 8, 123456));
        assert!(!journal_stream_is("8:123456", 8, 123457));
        assert!(!journal_stream_is("9:123456", 8, 123456));
        for bad in ["", "8", "8:", ":1", "a:b", "8:123456:1"] {
            assert!(!journal_stream_is(bad, 8, 123456), "{bad:?}");
        }
    }
}
