//! Logging: a tracing subscriber on stderr (journald and container runtimes collect it),
//! text or JSON, filtered by `log.level` of the configuration or, when set, by the
//! `VFIO_MIGD_LOG` environment variable (the same syntax: `info`, `vfio_migd=debug,warn`).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Overrides `log.level` without editing the configuration.
pub const LOG_ENV: &str = "VFIO_MIGD_LOG";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{origin}: invalid log filter `{filter}`: {message}")]
    BadFilter { origin: &'static str, filter: String, message: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The filter in force: `VFIO_MIGD_LOG` if set, else `log.level`.
pub fn filter(config: &LogConfig) -> Result<EnvFilter, TelemetryError> {
    let (origin, text) = match std::env::var(LOG_ENV) {
        Ok(text) if !text.trim().is_empty() => ("environment VFIO_MIGD_LOG", text),
        _ => ("configuration key `log.level`", config.level.clone()),
    };
    EnvFilter::builder().parse(&text).map_err(|e| TelemetryError::BadFilter {
        origin,
        filter: text,
        message: e.to_string(),
    })
}

/// Installs the global subscriber.
pub fn init(config: &LogConfig) -> Result<(), TelemetryError> {
    let filter = filter(config)?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let installed = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_level_names_its_origin() {
        let config = LogConfig { level: "vfio_migd=loud".into(), format: LogFormat::Text };
        // The variable is not set in the test environment unless a developer set it.
        if std::env::var(LOG_ENV).is_err() {
            let err = filter(&config).unwrap_err().to_string();
            assert!(err.contains("log.level"), "{err}");
            assert!(err.contains("vfio_migd=loud"), "{err}");
        }
        let good = LogConfig { level: "vfio_migd=debug,warn".into(), format: LogFormat::Json };
        if std::env::var(LOG_ENV).is_err() {
            assert!(filter(&good).is_ok());
        }
    }
}
