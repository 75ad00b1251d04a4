//! Log lines on stderr, with the trace and span ids of the current span when
//! tracing is on: `trace_id=… span_id=…` at the end of a text line, two more
//! fields of a JSON object.

use std::fmt;
use std::io::IsTerminal as _;

use opentelemetry::trace::TraceContextExt as _;
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::LogStyle;

pub(crate) fn layer<S>(style: LogStyle, trace_ids: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    // Colours only for people: log files and collectors get plain text.
    let ansi = std::io::stderr().is_terminal() && !trace_ids;
    let base = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match (style, trace_ids) {
        (LogStyle::Text, false) => base.boxed(),
        (LogStyle::Json, false) => base.json().boxed(),
        (LogStyle::Text, true) => base
            .event_format(WithTraceIds {
                inner: Format::default().with_ansi(false),
                json: false,
            })
            .boxed(),
        (LogStyle::Json, true) => base
            .json()
            .event_format(WithTraceIds {
                inner: Format::default().json(),
                json: true,
            })
            .boxed(),
    }
}

struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
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
    ) -> fmt::Result {
        let ids = ctx.lookup_current().and_then(|span| {
            let cx = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            })?;
            let span_context = cx.span().span_context().clone();
            span_context.is_valid().then(|| {
                (
                    span_context.trace_id().to_string(),
                    span_context.span_id().to_string(),
                )
            })
        });
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        if self.json
            && let Some(rest) = body.strip_prefix('{')
        {
            writeln!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            )
        } else {
            writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}")
        }
    }
}
