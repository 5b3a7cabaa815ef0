//! Log output: `text` (stderr), `json` (one object per line on stderr) or `journald` (native
//! journal fields, falling back to text when there is no journal socket). The level comes from
//! the configuration; `RUST_LOG` overrides it.
//!
//! Text from outside (API entries, the server's `ErrorInfo`) reaches a log line or an error
//! message only through [`Untrusted`]: escaped and capped, whatever the format.

use std::fmt::{self, Write as _};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Returns a warning to log once it is in place (journald
/// unavailable). Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init(cfg: &LogConfig) -> Option<String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // Colours only for a person at a terminal, never into the journal or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text =
        || tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    let mut warning = None;
    let result = match cfg.format {
        LogFormat::Text => tracing_subscriber::registry().with(filter()).with(text()).try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter())
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
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
pub const MAX_UNTRUSTED: usize = 256;

/// Text from outside as it may be shown: in double quotes, every control, format, separator
/// and other non-printable character escaped the way `{:?}` does (`\n`, `\r`, `\u{1b}`, …),
/// cut to [`MAX_UNTRUSTED`] characters with a `…` where it was cut. Whatever the server sends,
/// it cannot end a log line early, start a forged one or reach the terminal as an escape
/// sequence.
pub struct Untrusted<'a>(pub &'a str);

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
}
