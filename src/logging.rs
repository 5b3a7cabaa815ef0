//! Log output: `text` (stderr), `json` (one object per line on stderr) or `journald` (native
//! journal fields, falling back to text when there is no journal socket). The level comes from
//! the configuration; `RUST_LOG` overrides it.

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
