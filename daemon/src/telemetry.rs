//! Logging: a tracing subscriber on stderr (journald and container runtimes collect it),
//! text or JSON, filtered by `log.level` of the configuration or, when set, by the
//! `VFIO_MIGD_LOG` environment variable (the same syntax: `info`, `vfio_migd=debug,warn`).
//!
//! Under journald (`JOURNAL_STREAM` names our stderr, see systemd.exec(5)) every line
//! starts with its syslog priority (`<3>` error … `<7>` debug, sd-daemon(3)) so journald
//! files it at that priority, and text lines carry no timestamp of their own (journald
//! stamps them).
//!
//! Level and format can change while the daemon runs ([`LogHandle::apply`], on SIGHUP):
//! the filter sits behind a `tracing_subscriber::reload` layer, and both formatters are
//! installed at once with a switch choosing which one writes each event, so spans opened
//! before a format change stay readable by either.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer, Layered, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Overrides `log.level` without editing the configuration.
pub const LOG_ENV: &str = "VFIO_MIGD_LOG";

/// The level names a filter directive may end with (tracing's `LevelFilter`).
pub const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{origin}: invalid log filter `{filter}`: {message}")]
    BadFilter { origin: &'static str, filter: String, message: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// Checks that every directive of a filter ends with a level name. `EnvFilter` takes a bare
/// word as a *target* (`warning` means "everything from target `warning`"), which would
/// silence the daemon without a word: refuse it, naming the valid levels.
fn check_levels(text: &str) -> Result<(), String> {
    let valid = LEVELS.join(", ");
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `target[span{field=value}]` without `=level` enables every level of that span.
        if directive.ends_with(']') {
            continue;
        }
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level).trim();
        let lower = level.to_ascii_lowercase();
        if LEVELS.contains(&lower.as_str()) || matches!(lower.as_str(), "0" | "1" | "2" | "3" | "4" | "5") {
            continue;
        }
        let hint = LEVELS
            .iter()
            .find(|known| lower.starts_with(*known) || known.starts_with(lower.as_str()) && !lower.is_empty())
            .map(|known| format!(" (did you mean `{known}`?)"))
            .unwrap_or_default();
        return Err(format!(
            "`{level}` is not a log level{hint}; use one of {valid}, or TARGET=LEVEL such as vfio_migd=debug"
        ));
    }
    Ok(())
}

/// Where the filter in force comes from and its text: `VFIO_MIGD_LOG` if set, else `log.level`.
fn filter_source(config: &LogConfig) -> (&'static str, String) {
    match std::env::var(LOG_ENV) {
        Ok(text) if !text.trim().is_empty() => ("environment VFIO_MIGD_LOG", text),
        _ => ("configuration key `log.level`", config.level.clone()),
    }
}

/// The filter in force: `VFIO_MIGD_LOG` if set, else `log.level`; refused unless every
/// directive names a level.
pub fn filter(config: &LogConfig) -> Result<EnvFilter, TelemetryError> {
    let (origin, text) = filter_source(config);
    let bad = |message: String| TelemetryError::BadFilter { origin, filter: text.clone(), message };
    check_levels(&text).map_err(bad)?;
    EnvFilter::builder().parse(&text).map_err(|e| bad(e.to_string()))
}

/// `JOURNAL_STREAM` is `<device>:<inode>` of the stream systemd connected to journald;
/// it only counts if that stream is still our stderr (a child of the daemon inherits the
/// variable with other descriptors).
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(stat) => stat.st_dev == dev && stat.st_ino == ino,
        Err(_) => false,
    }
}

/// The syslog priority journald files a line at (sd-daemon(3): `<3>` error … `<7>` debug).
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Writes `<N>` before what the inner format writes.
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

fn text_layer(journal: bool) -> BoxedLayer {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if journal {
        layer
            .with_ansi(false)
            .event_format(SyslogPriority(tracing_subscriber::fmt::format().without_time().with_ansi(false)))
            .boxed()
    } else {
        layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed()
    }
}

fn json_layer(journal: bool) -> BoxedLayer {
    let format = || tracing_subscriber::fmt::format().json().flatten_event(true).with_current_span(true);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).fmt_fields(JsonFields::new());
    if journal {
        layer.event_format(SyslogPriority(format())).boxed()
    } else {
        layer.event_format(format()).boxed()
    }
}

/// Both formatters; each event goes to the one selected, every span to both.
struct FormatSwitch {
    text: BoxedLayer,
    json: BoxedLayer,
    json_active: Arc<AtomicBool>,
}

impl Layer<Filtered> for FormatSwitch {
    fn on_layer(&mut self, subscriber: &mut Filtered) {
        self.text.on_layer(subscriber);
        self.json.on_layer(subscriber);
    }
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, Filtered>) {
        self.text.on_new_span(attrs, id, ctx.clone());
        self.json.on_new_span(attrs, id, ctx);
    }
    fn on_record(&self, span: &Id, values: &Record<'_>, ctx: Context<'_, Filtered>) {
        self.text.on_record(span, values, ctx.clone());
        self.json.on_record(span, values, ctx);
    }
    fn on_follows_from(&self, span: &Id, follows: &Id, ctx: Context<'_, Filtered>) {
        self.text.on_follows_from(span, follows, ctx.clone());
        self.json.on_follows_from(span, follows, ctx);
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, Filtered>) {
        if self.json_active.load(Ordering::Relaxed) {
            self.json.on_event(event, ctx);
        } else {
            self.text.on_event(event, ctx);
        }
    }
    fn on_enter(&self, id: &Id, ctx: Context<'_, Filtered>) {
        self.text.on_enter(id, ctx.clone());
        self.json.on_enter(id, ctx);
    }
    fn on_exit(&self, id: &Id, ctx: Context<'_, Filtered>) {
        self.text.on_exit(id, ctx.clone());
        self.json.on_exit(id, ctx);
    }
    fn on_close(&self, id: Id, ctx: Context<'_, Filtered>) {
        self.text.on_close(id.clone(), ctx.clone());
        self.json.on_close(id, ctx);
    }
    fn on_id_change(&self, old: &Id, new: &Id, ctx: Context<'_, Filtered>) {
        self.text.on_id_change(old, new, ctx.clone());
        self.json.on_id_change(old, new, ctx);
    }
}

/// Changes the installed subscriber's level and format.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    json_active: Arc<AtomicBool>,
    in_force: Mutex<LogConfig>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle").field("in_force", &self.in_force).finish_non_exhaustive()
    }
}

impl LogHandle {
    /// Puts `new` in force. Returns what changed (empty when nothing did); a bad filter
    /// leaves the one in force untouched.
    pub fn apply(&self, new: &LogConfig) -> Result<Vec<String>, TelemetryError> {
        let filter = filter(new)?;
        let mut in_force = self.in_force.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        if new.level != in_force.level {
            if filter_source(new).0 == "environment VFIO_MIGD_LOG" {
                changed.push(format!("log.level `{}` noted; {LOG_ENV} still overrides it", new.level));
            } else {
                self.filter.reload(filter).map_err(|e| TelemetryError::Reload(e.to_string()))?;
                changed.push(format!("log.level `{}` → `{}`", in_force.level, new.level));
            }
        }
        if new.format != in_force.format {
            self.json_active.store(new.format == LogFormat::Json, Ordering::Relaxed);
            changed.push(format!("log.format {} → {}", in_force.format.as_str(), new.format.as_str()));
        }
        *in_force = new.clone();
        Ok(changed)
    }
}

/// Installs the global subscriber; the handle changes its level and format later.
pub fn init(config: &LogConfig) -> Result<LogHandle, TelemetryError> {
    let filter = filter(config)?;
    let journal = stderr_is_journal();
    let (filter_layer, filter_handle) = reload::Layer::new(filter);
    let json_active = Arc::new(AtomicBool::new(config.format == LogFormat::Json));
    let switch = FormatSwitch {
        text: text_layer(journal),
        json: json_layer(journal),
        json_active: json_active.clone(),
    };
    Registry::default()
        .with(filter_layer)
        .with(switch)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(LogHandle { filter: filter_handle, json_active, in_force: Mutex::new(config.clone()) })
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

    #[test]
    fn words_that_are_not_levels_are_refused_with_the_valid_ones() {
        for (text, hint) in [("warning", "warn"), ("infoo", "info"), ("vfio_migd=inf", "info")] {
            let err = check_levels(text).unwrap_err();
            assert!(err.contains(&format!("did you mean `{hint}`")), "{text}: {err}");
            assert!(err.contains("trace, debug, info, warn, error, off"), "{text}: {err}");
        }
        assert!(check_levels("loud").unwrap_err().contains("`loud` is not a log level"));
        for good in
            ["info", "WARN", "vfio_migd=debug,warn", "off", "h2=off, info", "3", "vfio_migd[job{id=1}]"]
        {
            assert_eq!(check_levels(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(
            [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE].map(|l| syslog_priority(&l)),
            [3, 4, 6, 7, 7]
        );
    }
}
