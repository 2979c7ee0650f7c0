//! Logging as node_exporter does it: `--log.level` (debug, info, warn, error) and
//! `--log.format` (logfmt, json), on stderr. `QTRACE_LOG`, when set, is an `EnvFilter`
//! directive (e.g. `debug,aya=warn`) that overrides `--log.level`.

use std::{fmt, io::IsTerminal};

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{
    field::Visit,
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
    EnvFilter,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Logfmt,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LogOptions {
    /// Least severe messages logged; `QTRACE_LOG` (an EnvFilter directive such as
    /// `debug,aya=warn`) overrides it.
    #[arg(long = "log.level", global = true, value_enum, default_value = "info")]
    pub level: LogLevel,
    /// Log line format on stderr.
    #[arg(
        long = "log.format",
        global = true,
        value_enum,
        default_value = "logfmt"
    )]
    pub format: LogFormat,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        // aya warns when it cannot raise RLIMIT_MEMLOCK, which only happens without
        // privileges; the capability error that follows says what to do.
        match self {
            LogLevel::Debug => "debug,aya::sys::bpf=error",
            LogLevel::Info => "info,aya::sys::bpf=error",
            LogLevel::Warn => "warn,aya::sys::bpf=error",
            LogLevel::Error => "error",
        }
    }
}

pub fn init(opts: &LogOptions) {
    let filter = EnvFilter::try_from_env("QTRACE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(opts.level.directive()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match opts.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Logfmt => builder
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Logfmt)
            .init(),
    }
}

/// `time=… level=info source=qtrace::cli::run msg="…" key=value`, one line per event.
struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        // Events of the `log` crate (aya's) carry their origin as log.* fields.
        let source = fields
            .rest
            .iter()
            .find(|(k, _)| *k == "log.target")
            .map_or(meta.target(), |(_, v)| v.as_str())
            .to_string();
        fields.rest.retain(|(k, _)| !k.starts_with("log."));
        write!(w, "time={now} level={level} source={source}")?;
        write!(w, " msg={}", quoted(&fields.message))?;
        for (k, v) in &fields.rest {
            write!(w, " {k}={}", quoted(v))?;
        }
        writeln!(w)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            name => self.rest.push((name, value.to_string())),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            name => self.rest.push((name, format!("{value:?}"))),
        }
    }
}

/// A logfmt value: bare when it needs no quoting, else in quotes with `"`, `\` and control
/// characters escaped (so a message is always one line).
fn quoted(v: &str) -> String {
    let bare = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_values_are_quoted_only_when_needed_and_stay_on_one_line() {
        assert_eq!(quoted("info"), "info");
        assert_eq!(quoted("a b"), "\"a b\"");
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("k=v"), "\"k=v\"");
        assert_eq!(
            quoted("say \"hi\"\nthen\\"),
            "\"say \\\"hi\\\"\\nthen\\\\\""
        );
    }
}
