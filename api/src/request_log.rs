//! Which request a log line was written in: its id (the client's `X-Request-Id`, or one made up),
//! method and path, on every line logged while the request is handled.
//!
//! A tracing span per request did this, and cost ~2 µs of CPU per request (creating it, formatting
//! its fields, entering and leaving it at every poll, closing it: 3 % of the server's CPU per task
//! under `taskledger-bench` lifecycle) for lines that are almost never written. So a request runs
//! inside a task-local [`RequestContext`] instead (a method and a URI cloned, the id made only
//! when a line needs it), and [`WithRequest`] adds it to the lines logged inside that task: as
//! `request_id=… method=… path=…` at the end of a text line, and as the `span`/`spans` keys a
//! request span gave a JSON line, so JSON consumers read the same fields as before. (Such a
//! line is formatted into a string first, so a terminal shows it without colours.)
//!
//! A log filter by span (`TASKLEDGER_LOG='[request{path=/v1/claims}]=debug'`) needs the span
//! itself: with one, every request gets its span as before ([`use_request_spans`]).

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use tracing::{Event, Instrument, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Longest client `X-Request-Id` kept in the logs.
const REQUEST_ID_BYTES_MAX: usize = 128;

/// Whether requests get a tracing span each (set once, before serving, by a log filter by span).
static REQUEST_SPANS: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    static REQUEST: RequestContext;
}

/// Gives every request a span of its own instead of a task-local context: for a log filter that
/// selects lines by span.
pub fn use_request_spans() {
    REQUEST_SPANS.store(true, Ordering::Relaxed);
}

/// The request a line is logged in.
pub struct RequestContext {
    /// The client's plain `X-Request-Id`, or one generated the first time a line needs it.
    id: OnceLock<String>,
    method: Method,
    uri: Uri,
}

impl RequestContext {
    fn of(request: &Request) -> RequestContext {
        let given = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| plain_request_id(id))
            .map(str::to_owned);
        RequestContext {
            id: given.map(OnceLock::from).unwrap_or_default(),
            method: request.method().clone(),
            uri: request.uri().clone(),
        }
    }

    fn id(&self) -> &str {
        self.id.get_or_init(|| uuid::Uuid::new_v4().simple().to_string())
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!("request", request_id = %self.id(), method = %self.method, path = %self.uri.path())
    }

    /// ` request_id=… method=… path=…`, as the text format writes a span's fields.
    fn text_fields(&self) -> String {
        format!(" request_id={} method={} path={}", self.id(), self.method, self.uri.path())
    }

    /// The request as the JSON format writes a span.
    fn json_span(&self) -> serde_json::Value {
        serde_json::json!({
            "request_id": self.id(),
            "method": self.method.as_str(),
            "path": self.uri.path(),
            "name": "request",
        })
    }
}

/// Whether a client's `X-Request-Id` goes into the logs as it is: 1 to 128 bytes of
/// `A-Z a-z 0-9 . _ : / -`. Anything else (empty, long, with spaces, quotes or braces that would
/// forge fields in the text log) is replaced by a generated id.
fn plain_request_id(id: &str) -> bool {
    (1..=REQUEST_ID_BYTES_MAX).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

/// Runs a request in its context (or span), and logs an answer of the server's own failing
/// (a 5xx) at DEBUG. The server's errors are logged where they are made, with their stable code
/// (`ApiError`'s `IntoResponse`: every 5xx but a 503, which is an answer by design — load shed,
/// not ready yet — counted in `/metrics`; logging each would flood the log exactly when the
/// server is busiest).
pub async fn in_request_context(request: Request, next: Next) -> Response {
    let context = RequestContext::of(&request);
    let started = Instant::now();
    let handled = async move {
        let response = next.run(request).await;
        if response.status().is_server_error() {
            let latency_ms = started.elapsed().as_millis();
            tracing::debug!(status = response.status().as_u16(), latency_ms, "response failed");
        }
        response
    };
    if REQUEST_SPANS.load(Ordering::Relaxed) {
        let span = context.span();
        handled.instrument(span).await
    } else {
        REQUEST.scope(context, handled).await
    }
}

/// An event format that adds the request a line was logged in (see the module's comment).
pub struct WithRequest<F> {
    inner: F,
    json: bool,
}

impl<F> WithRequest<F> {
    pub fn new(inner: F, json: bool) -> WithRequest<F> {
        WithRequest { inner, json }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithRequest<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        if REQUEST.try_with(|_| ()).is_err() {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let line = REQUEST.with(|context| with_fields(&line, context, self.json));
        writer.write_str(&line)
    }
}

/// `line` with the request's fields added: in a JSON line, the request as the outermost of its
/// `spans` (and as its `span` when it has none of its own), before its closing brace; in a text
/// line, at the end, before the newline.
fn with_fields(line: &str, context: &RequestContext, json: bool) -> String {
    let body = line.strip_suffix('\n').unwrap_or(line);
    let mut out = String::with_capacity(line.len() + 160);
    match body.strip_suffix('}').filter(|_| json) {
        // Spans of its own (a command's, at DEBUG): the request is their root. (A field's value
        // cannot hold the key: its quotes are escaped.)
        Some(open) => match open.split_once(SPANS_KEY) {
            Some((before, after)) => {
                let _ = write!(out, "{before}{SPANS_KEY}{},{after}}}", context.json_span());
            }
            None => {
                let span = context.json_span();
                let comma = if open.ends_with('{') { "" } else { "," };
                let _ = write!(out, "{open}{comma}\"span\":{span},\"spans\":[{span}]}}");
            }
        },
        None => {
            let _ = write!(out, "{body}{}", context.text_fields());
        }
    }
    if line.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Where the JSON format lists an event's spans, outermost first.
const SPANS_KEY: &str = "\"spans\":[";

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by a black-box check: an id with spaces and quotes forged fields in the text log,
    /// and one of 5,000 characters was logged in full.
    #[test]
    fn only_plain_request_ids_are_logged_as_given() {
        for id in ["req-1", "a.b_c:d/e-F9", "svc.orders:17/retry_2", &"x".repeat(REQUEST_ID_BYTES_MAX)] {
            assert!(plain_request_id(id), "{id}");
        }
        for id in
            ["", "has space", "q\"uote", "x=1}", "brace{", "new\nline", "é", &"x".repeat(REQUEST_ID_BYTES_MAX + 1)]
        {
            assert!(!plain_request_id(id), "{id}");
        }
    }

    fn context(method: &str, uri: &str, id: &str) -> RequestContext {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-request-id", id)
            .body(axum::body::Body::empty())
            .unwrap();
        RequestContext::of(&request)
    }

    #[test]
    fn a_text_line_gets_the_request_at_its_end() {
        let context = context("GET", "/v1/views/queue?ns=a", "r1");
        assert_eq!(
            with_fields("T  INFO api: started\n", &context, false),
            "T  INFO api: started request_id=r1 method=GET path=/v1/views/queue\n"
        );
        assert_eq!(
            with_fields("no newline", &context, false),
            "no newline request_id=r1 method=GET path=/v1/views/queue"
        );
    }

    #[test]
    fn a_json_line_gets_the_keys_a_request_span_gave_it() {
        let context = context("POST", "/v1/tasks?x=1", "order-17");
        let span =
            serde_json::json!({"request_id": "order-17", "method": "POST", "path": "/v1/tasks", "name": "request"});
        for line in ["{\"level\":\"ERROR\"}\n", "{}\n"] {
            let spliced = with_fields(line, &context, true);
            let parsed: serde_json::Value = serde_json::from_str(&spliced).unwrap();
            assert_eq!(parsed["span"], span, "{spliced}");
            assert_eq!(parsed["spans"], serde_json::json!([span]), "{spliced}");
            assert!(spliced.ends_with("}\n"), "{spliced}");
        }
    }

    /// A line logged in a span of its own inside the request (a command's, at DEBUG) keeps that
    /// span as its `span`, with the request as the root of its `spans`, once.
    #[test]
    fn a_json_line_with_spans_of_its_own_gets_the_request_as_their_root() {
        let context = context("POST", "/v1/claims", "c-1");
        let command = serde_json::json!({"kind": "claim", "name": "command"});
        let line = format!("{{\"level\":\"DEBUG\",\"span\":{command},\"spans\":[{command}]}}\n");
        let spliced = with_fields(&line, &context, true);
        let parsed: serde_json::Value = serde_json::from_str(&spliced).unwrap();
        let request =
            serde_json::json!({"request_id": "c-1", "method": "POST", "path": "/v1/claims", "name": "request"});
        assert_eq!(parsed["span"], command, "{spliced}");
        assert_eq!(parsed["spans"], serde_json::json!([request, command]), "{spliced}");
        assert_eq!(spliced.matches("\"span\":").count(), 1, "{spliced}");
    }

    #[test]
    fn a_request_without_a_plain_id_gets_one_made_up_once() {
        let context = context("GET", "/v1/claims", "bad id");
        let first = context.id().to_owned();
        assert_eq!(first.len(), 32, "{first}");
        assert_eq!(context.id(), first, "the same id on every line of the request");
    }
}
