//! GraphQL subscriptions over a WebSocket at `/graphql/ws`: authentication in `connection_init`,
//! and the close codes of the graphql-transport-ws protocol.
//!
//! async-graphql runs the protocol, but closes every protocol error with 1002 (or 1011), where
//! graphql-transport-ws (the `graphql-ws` library's protocol, which Apollo and urql clients
//! speak) names each: 4400 for a message it cannot read, 4401 for a `subscribe` before the
//! connection is acknowledged, 4403 for a refused `connection_init`, 4408 when none came in
//! time, 4409 for a `subscribe` whose id is already running (async-graphql dropped the running
//! subscription without a word and started the new one). Clients decide from the code whether to
//! reconnect. This module reads each message's `type` and `id` on the way in and rewrites the
//! close frame on the way out; a close reason is cut to the 123 bytes a close frame holds (a
//! longer one, like a JSON parser's message, failed to send and the socket ended with no code).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_graphql::Data;
use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};

use crate::auth::{Principal, Tokens};
use crate::graphql::{LedgerSchema, principal_from};
use crate::server::AppState;
use crate::streams::CatchingUp;

/// How long a WebSocket may take to authenticate (`connection_init` with a valid token) before
/// it is closed with 4408.
pub const WS_INIT_WAIT: Duration = Duration::from_secs(10);

/// How long after [`WS_INIT_WAIT`] an unauthenticated socket is dropped outright, should its
/// close frame not get out (a client that does not read).
const WS_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The close codes graphql-transport-ws defines beyond async-graphql's.
pub mod close_code {
    /// A message that is not one of the protocol's.
    pub const BAD_REQUEST: u16 = 4400;
    /// A `subscribe` before `connection_ack`.
    pub const UNAUTHORIZED: u16 = 4401;
    /// A `connection_init` without a valid token, or the socket's token revoked by a reload.
    pub const FORBIDDEN: u16 = 4403;
    /// No `connection_init` within [`super::WS_INIT_WAIT`].
    pub const INIT_TIMEOUT: u16 = 4408;
    /// A `subscribe` whose id names a subscription still running.
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    /// A `subscribe` beyond [`super::OPERATIONS_PER_SOCKET_MAX`] running at once (RFC 6455's
    /// policy violation).
    pub const TOO_MANY_OPERATIONS: u16 = 1008;
}

/// Operations (queries, mutations, subscriptions) one socket runs at once. The HTTP limits
/// (`--max-connections`, `--max-concurrent-requests`, the request timeout) hold for the upgrade
/// only: one socket ran as many long-polling claims as it sent, and 10,000 of them filled the
/// writer's queue for every other client (found by a review).
pub const OPERATIONS_PER_SOCKET_MAX: usize = 64;

/// Longest a socket waits at shutdown for its subscriptions' `complete` messages to go out
/// before it closes with [`GOING_AWAY`].
const SHUTDOWN_COMPLETES_WAIT: Duration = Duration::from_secs(1);

/// RFC 6455's close code for a server going down.
const GOING_AWAY: u16 = 1001;

/// The largest close reason a close frame carries (RFC 6455: 125 bytes of payload, 2 of code).
const CLOSE_REASON_MAX: usize = 123;

/// GET /graphql/ws: subscriptions (graphql-transport-ws, and the older graphql-ws).
pub async fn graphql_ws(
    State(state): State<AppState>,
    axum::Extension(schema): axum::Extension<LedgerSchema>,
    protocol: GraphQLProtocol,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let transport_ws = speaks_transport_ws(&headers);
    // A message is read whole and parsed before the socket has authenticated: no larger than a
    // request body may be (axum's default, 64 MiB, let any client make the server build
    // gigabytes of JSON values: found by review).
    upgrade
        .max_message_size(state.max_body_bytes)
        .max_frame_size(state.max_body_bytes)
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let _open = state.open_sockets.open();
            let bulk_reads = state.bulk_reads.clone();
            let catching_up = Arc::new(CatchingUp::default());
            let socket_catching_up = catching_up.clone();
            let connection = Arc::new(Connection { transport_ws, ..Connection::default() });
            let (sink, stream) = socket.split();
            let outgoing = connection.clone();
            let sink = sink.with_flat_map(move |message| {
                futures_util::stream::iter(outgoing.outgoing(message).map(Ok::<_, axum::Error>))
            });
            let stream = incoming_messages(stream, connection.clone(), state.stopping.clone(), state.tokens.clone());
            let accepted = connection.clone();
            let serve = GraphQLWebSocket::new_with_pair(sink, stream, schema, protocol)
                .on_connection_init(move |payload| async move {
                    // Both spellings at once are refused, as two Authorization headers are.
                    let authorization = match (payload.get("Authorization"), payload.get("authorization")) {
                        (Some(_), Some(_)) => None,
                        (given, None) | (None, given) => given.and_then(|v| v.as_str()).map(str::to_owned),
                    };
                    match principal_from(&state, authorization.as_deref()) {
                        Some(principal) => {
                            *accepted.principal.lock().expect("websocket state") = Some(principal.clone());
                            let mut data = Data::default();
                            data.insert(principal);
                            data.insert(socket_catching_up);
                            accepted.initialised.store(true, Ordering::Release);
                            Ok(data)
                        }
                        None => {
                            accepted.refused.store(true, Ordering::Release);
                            Err(async_graphql::Error::new(match authorization {
                                None => "connection_init needs {\"Authorization\": \"Bearer <token>\"}",
                                Some(_) => "unknown, revoked or malformed token in connection_init's Authorization",
                            }))
                        }
                    }
                })
                .serve();
            let serve = crate::streams::serve_by_catch_up(&bulk_reads, catching_up, serve);
            let mut serve = std::pin::pin!(serve);
            // A socket that has not authenticated in time is closed: it would hold a
            // connection slot forever (found by a black-box check: three bare sockets took every
            // slot of `--max-connections 3`, and /healthz went unanswered). The close frame
            // above ends it; this ends one whose client does not read.
            tokio::select! {
                () = &mut serve => {}
                () = tokio::time::sleep(WS_INIT_WAIT + WS_CLOSE_GRACE) => {
                    if connection.initialised.load(Ordering::Acquire) {
                        serve.await;
                    }
                }
            }
        })
        .into_response()
}

/// The client's messages as async-graphql reads them: each through [`Connection::incoming`];
/// a read error (a message over the size limit: the socket ended without a close frame, and the
/// `graphql-ws` client sent it again forever) becomes a close with 1009 or 1002; and, if no
/// `connection_init` was accepted within [`WS_INIT_WAIT`], a close with 4408. Ends when the
/// client's side does (a deadline running beside it kept a socket the client had closed open
/// until 10 s after it connected, and the `graphql-ws` client in lazy mode waits for that
/// before its next operation: found by a client-library check). A reload of the tokens that
/// revokes, removes or changes the socket's token closes it with 4403 (its subscriptions went
/// on streaming to a revoked token).
fn incoming_messages(
    socket: impl futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
    connection: Arc<Connection>,
    stopping: tokio::sync::watch::Receiver<bool>,
    tokens: Tokens,
) -> impl futures_util::Stream<Item = Result<Message, axum::Error>> + Send {
    let deadline = Box::pin(tokio::time::sleep(WS_INIT_WAIT));
    let holder = connection.clone();
    let revoked = Box::pin(async move {
        tokens.revoked(|| holder.principal.lock().expect("websocket state").clone()).await;
    });
    // At shutdown the subscriptions complete; once their `complete` messages are out, the
    // socket closes with 1001 (Going Away), where it ended without a close frame (found by a
    // client-library check).
    let running = connection.clone();
    let shutdown = Box::pin(async move {
        let mut stopping = stopping;
        let _ = stopping.wait_for(|stop| *stop).await;
        let started = tokio::time::Instant::now();
        while !running.running.lock().expect("websocket state").is_empty()
            && started.elapsed() < SHUTDOWN_COMPLETES_WAIT
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let ends = futures_util::future::select(shutdown, revoked);
    futures_util::stream::unfold(
        (socket, Some(deadline), ends, connection, false),
        |(mut socket, mut deadline, mut ends, connection, ended)| async move {
            if ended {
                return None;
            }
            let next = loop {
                tokio::select! {
                    next = socket.next() => break next,
                    () = async { deadline.as_mut().expect("checked by the branch").await }, if deadline.is_some() => {
                        deadline = None;
                        if !connection.initialised.load(Ordering::Acquire) {
                            let message = connection
                                .violated(close_code::INIT_TIMEOUT, "Connection initialisation timeout".to_owned());
                            return Some((Ok(message), (socket, deadline, ends, connection, true)));
                        }
                    }
                    ended = &mut ends => {
                        let message = match ended {
                            futures_util::future::Either::Left(_) => {
                                connection.violated(GOING_AWAY, "the server is shutting down".to_owned())
                            }
                            futures_util::future::Either::Right(_) => connection.violated(
                                close_code::FORBIDDEN,
                                "the token was revoked, removed or changed by a reload of the tokens".to_owned(),
                            ),
                        };
                        return Some((Ok(message), (socket, deadline, ends, connection, true)));
                    }
                }
            };
            let message = match next? {
                Ok(message) => connection.incoming(message),
                Err(error) => {
                    let text = error.to_string();
                    let code = if text.contains("too long") || text.contains("limit") { 1009 } else { 1002 };
                    let message = connection.violated(code, text);
                    return Some((Ok(message), (socket, deadline, ends, connection, true)));
                }
            };
            Some((Ok(message), (socket, deadline, ends, connection, false)))
        },
    )
}

/// Whether the socket speaks graphql-transport-ws: the first protocol the client offers that
/// async-graphql knows, as its `GraphQLProtocol` picks it.
fn speaks_transport_ws(headers: &axum::http::HeaderMap) -> bool {
    let offered = headers.get(axum::http::header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok());
    let first_known = offered.and_then(|protocols| {
        protocols
            .split(',')
            .map(str::trim)
            .find(|p| p.eq_ignore_ascii_case("graphql-transport-ws") || p.eq_ignore_ascii_case("graphql-ws"))
    });
    first_known.is_some_and(|p| p.eq_ignore_ascii_case("graphql-transport-ws"))
}

/// What one socket has seen, shared by the reading and the writing side.
#[derive(Default)]
struct Connection {
    /// The protocol is graphql-transport-ws (not the older graphql-ws).
    transport_ws: bool,
    /// Ids whose first answer has gone out.
    answered: std::sync::Mutex<HashSet<String>>,
    /// Ids answered with an `error` message, whose `complete` is not sent.
    errored: std::sync::Mutex<HashSet<String>>,
    /// `connection_init` was accepted.
    initialised: AtomicBool,
    /// `connection_init` was refused.
    refused: AtomicBool,
    /// The close code and reason a protocol error found on the way in calls for.
    violation: std::sync::Mutex<Option<(u16, String)>>,
    /// Ids of the subscriptions running.
    running: std::sync::Mutex<HashSet<String>>,
    /// Who `connection_init` authenticated, to look at again when the tokens are reloaded.
    principal: std::sync::Mutex<Option<Principal>>,
}

/// The parts of a server message this module reads.
#[derive(serde::Deserialize)]
struct Completed {
    id: String,
}

/// What async-graphql reads as a message it cannot parse, so that it closes the socket.
const UNREADABLE: &str = "";

impl Connection {
    /// Records the code a protocol error calls for and returns the message that makes
    /// async-graphql close the socket.
    fn violated(&self, code: u16, reason: String) -> Message {
        self.violation.lock().expect("websocket state").get_or_insert((code, reason));
        Message::Text(UNREADABLE.into())
    }

    /// A client message, on its way to async-graphql.
    fn incoming(&self, message: Message) -> Message {
        let bytes: &[u8] = match &message {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
            _ => return message,
        };
        // Read once: a key named twice in one object (in `variables`, say) is refused, as over
        // POST /graphql; text that is not JSON is left to async-graphql to refuse.
        let value = match serde_json::from_slice::<crate::wire::UniqueKeys>(bytes) {
            Ok(crate::wire::UniqueKeys(value)) => value,
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                return self.violated(close_code::BAD_REQUEST, format!("Invalid message: {e}"));
            }
            Err(_) => return message,
        };
        let (Some(kind), Some(id)) =
            (value.get("type").and_then(|v| v.as_str()), value.get("id").and_then(|v| v.as_str()))
        else {
            return message;
        };
        let id = id.to_owned();
        let mut running = self.running.lock().expect("websocket state");
        match kind {
            // Before the acknowledgement async-graphql closes with 1011, sent on as 4401.
            "subscribe" | "start" if self.initialised.load(Ordering::Acquire) => {
                if running.contains(&id) {
                    drop(running);
                    return self.violated(close_code::SUBSCRIBER_EXISTS, format!("Subscriber for {id} already exists"));
                }
                if running.len() >= OPERATIONS_PER_SOCKET_MAX {
                    drop(running);
                    return self.violated(
                        close_code::TOO_MANY_OPERATIONS,
                        format!("more than {OPERATIONS_PER_SOCKET_MAX} operations at once on one socket"),
                    );
                }
                running.insert(id);
                message
            }
            "complete" | "stop" => {
                running.remove(&id);
                message
            }
            _ => message,
        }
    }

    /// Whether `id`'s answer going out is its first (a subscription's first event, or a query's
    /// only answer), remembering it if so.
    fn remember_first_answer(&self, id: &str) -> bool {
        let mut answered = self.answered.lock().expect("websocket state");
        !answered.contains(id) && answered.insert(id.to_owned())
    }

    /// A server message, on its way to the client (or not): a close frame gets the code the
    /// protocol names; an operation refused before it ran (its first answer has errors and no
    /// data, none of them at a path) is an `error` message, and no `complete` follows it, as
    /// graphql-transport-ws says (async-graphql sent a `next` and a `complete`, which clients
    /// take for a result: found by a client-library check).
    fn outgoing(&self, message: Message) -> Option<Message> {
        Some(match message {
            Message::Text(message) => {
                let text = message.as_str();
                if text.starts_with(r#"{"type":"complete","#)
                    && let Ok(completed) = serde_json::from_str::<Completed>(text)
                {
                    self.running.lock().expect("websocket state").remove(&completed.id);
                    self.answered.lock().expect("websocket state").remove(&completed.id);
                    if self.errored.lock().expect("websocket state").remove(&completed.id) {
                        return None;
                    }
                } else if self.transport_ws
                    && text.starts_with(r#"{"type":"next","#)
                    && let Some(id) = next_id(text)
                    && self.remember_first_answer(&id)
                    && let Some(errors) = refused_before_running(text)
                {
                    self.errored.lock().expect("websocket state").insert(id.clone().into_owned());
                    let error = serde_json::json!({ "type": "error", "id": id, "payload": errors });
                    return Some(Message::Text(error.to_string().into()));
                }
                Message::Text(message)
            }
            Message::Close(Some(frame)) => {
                let violation = self.violation.lock().expect("websocket state").take();
                let (code, reason) = match (violation, frame.code) {
                    (Some(violation), _) => violation,
                    (None, 1002) if self.refused.load(Ordering::Acquire) => {
                        (close_code::FORBIDDEN, frame.reason.as_str().to_owned())
                    }
                    (None, 1002) => (close_code::BAD_REQUEST, frame.reason.as_str().to_owned()),
                    (None, 1011) => (close_code::UNAUTHORIZED, "Unauthorized".to_owned()),
                    (None, code) => (code, frame.reason.as_str().to_owned()),
                };
                Message::Close(Some(CloseFrame { code, reason: truncated(reason).into() }))
            }
            other => other,
        })
    }
}

/// The `id` of a `next` message `text`: read where async-graphql writes it (`{"type":"next",
/// "id":"…"`, before the payload) without parsing the payload, or from the whole message when
/// it is written otherwise (an escape in the id, the fields in another order). A subscriber
/// gets one `next` an event, so this runs for every event sent.
fn next_id(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(id) = text.strip_prefix(r#"{"type":"next","id":""#).and_then(|id| id.split_once('"')).map(|(id, _)| id)
        && !id.contains('\\')
    {
        return Some(std::borrow::Cow::Borrowed(id));
    }
    serde_json::from_str::<Completed>(text).ok().map(|next| std::borrow::Cow::Owned(next.id))
}

/// The errors of a `next` message whose payload has no data and only errors without a path:
/// the operation was refused before it ran (it did not parse or validate, or an argument was
/// refused).
fn refused_before_running(next: &str) -> Option<Vec<serde_json::Value>> {
    #[derive(serde::Deserialize)]
    struct Next {
        payload: Payload,
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        #[serde(default)]
        data: serde_json::Value,
        #[serde(default)]
        errors: Vec<serde_json::Value>,
    }
    let Next { payload } = serde_json::from_str(next).ok()?;
    let refused = payload.data.is_null()
        && !payload.errors.is_empty()
        && payload.errors.iter().all(|error| error.get("path").is_none_or(serde_json::Value::is_null));
    // Errors async-graphql raises when it picks the operation ("Unknown operation named …")
    // come without the code `POST /graphql` gives them.
    refused.then(|| {
        payload
            .errors
            .into_iter()
            .map(|mut error| {
                if let Some(error) = error.as_object_mut() {
                    let extensions = error.entry("extensions").or_insert_with(|| serde_json::json!({}));
                    if let Some(extensions) = extensions.as_object_mut() {
                        extensions.entry("code").or_insert_with(|| "invalid_query".into());
                    }
                }
                error
            })
            .collect()
    })
}

/// `reason` cut to [`CLOSE_REASON_MAX`] bytes, at a character boundary.
fn truncated(mut reason: String) -> String {
    if reason.len() > CLOSE_REASON_MAX {
        let mut end = CLOSE_REASON_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(truncated("short".into()), "short");
        let long = "é".repeat(100);
        let cut = truncated(long);
        assert!(cut.len() <= CLOSE_REASON_MAX && cut.len() >= CLOSE_REASON_MAX - 1, "{}", cut.len());
        assert!(cut.chars().all(|c| c == 'é'));
    }

    /// graphql-transport-ws: an operation refused before it ran is one `error` message; one that
    /// ran keeps its `next` and `complete`, errors and all.
    #[test]
    fn an_operation_refused_before_it_ran_is_an_error_message_without_complete() {
        let connection = Connection { transport_ws: true, ..Connection::default() };
        let text = |message: Option<Message>| match message {
            Some(Message::Text(text)) => Some(serde_json::from_str::<serde_json::Value>(text.as_str()).unwrap()),
            None => None,
            other => panic!("{other:?}"),
        };
        let refused = r#"{"type":"next","id":"r","payload":{"data":null,"errors":[{"message":"Unknown field","extensions":{"code":"invalid_query"}}]}}"#;
        let error = text(connection.outgoing(Message::Text(refused.into()))).unwrap();
        assert_eq!(error["type"], "error");
        assert_eq!(error["payload"][0]["extensions"]["code"], "invalid_query");
        assert_eq!(text(connection.outgoing(Message::Text(r#"{"type":"complete","id":"r"}"#.into()))), None);
        // Errors at a path came from a resolver that ran: a result.
        let ran = r#"{"type":"next","id":"s","payload":{"data":null,"errors":[{"message":"x","path":["events"]}]}}"#;
        assert_eq!(text(connection.outgoing(Message::Text(ran.into()))).unwrap()["type"], "next");
        assert!(text(connection.outgoing(Message::Text(r#"{"type":"complete","id":"s"}"#.into()))).is_some());
        // Only an operation's first answer: a later one with errors is a result too.
        let data = r#"{"type":"next","id":"t","payload":{"data":{"events":{"seq":1}}}}"#;
        assert_eq!(text(connection.outgoing(Message::Text(data.into()))).unwrap()["type"], "next");
        let later = r#"{"type":"next","id":"t","payload":{"data":null,"errors":[{"message":"gone"}]}}"#;
        assert_eq!(text(connection.outgoing(Message::Text(later.into()))).unwrap()["type"], "next");
        // The older protocol has no such message.
        let legacy = Connection::default();
        assert_eq!(text(legacy.outgoing(Message::Text(refused.into()))).unwrap()["type"], "next");
    }

    /// A `next` message's id is read where async-graphql writes it, and from the whole message
    /// when it has an escape or stands elsewhere: an id that reads wrong would send a refusal's
    /// `error` under another id, or pass a refusal as a `next`.
    #[test]
    fn a_next_message_id_is_read_without_parsing_its_payload_and_escapes_are_parsed() {
        let id = |text: &str| next_id(text).map(std::borrow::Cow::into_owned);
        let plain = r#"{"type":"next","id":"events-7","payload":{"data":{"events":{"data":{"id":"x\"y"}}}}}"#;
        assert!(matches!(next_id(plain), Some(std::borrow::Cow::Borrowed("events-7"))));
        assert_eq!(id(r#"{"type":"next","id":"a\"b","payload":{}}"#).as_deref(), Some("a\"b"));
        assert_eq!(id(r#"{"type":"next","id":"caf\u00e9","payload":{}}"#).as_deref(), Some("café"));
        assert_eq!(id(r#"{"type":"next","payload":{},"id":"late"}"#).as_deref(), Some("late"));
        assert_eq!(id(r#"{"type":"next","payload":{}}"#), None);
        // A refusal under an escaped id is still an `error` message, under that id.
        let connection = Connection { transport_ws: true, ..Connection::default() };
        let refused = r#"{"type":"next","id":"q\"1","payload":{"data":null,"errors":[{"message":"no"}]}}"#;
        let Some(Message::Text(error)) = connection.outgoing(Message::Text(refused.into())) else { panic!() };
        let error: serde_json::Value = serde_json::from_str(error.as_str()).unwrap();
        assert_eq!((error["type"].as_str(), error["id"].as_str()), (Some("error"), Some("q\"1")));
    }

    #[test]
    fn a_running_id_subscribed_again_is_a_violation_and_a_completed_one_is_not() {
        let connection = Connection::default();
        connection.initialised.store(true, Ordering::Release);
        let subscribe = || Message::Text(r#"{"type":"subscribe","id":"a","payload":{"query":"{x}"}}"#.into());
        assert!(matches!(connection.incoming(subscribe()), Message::Text(t) if !t.is_empty()));
        // Completed by the server: the id is free again.
        let _ = connection.outgoing(Message::Text(r#"{"type":"complete","id":"a"}"#.into()));
        assert!(matches!(connection.incoming(subscribe()), Message::Text(t) if !t.is_empty()));
        assert!(matches!(connection.incoming(subscribe()), Message::Text(t) if t.is_empty()));
        let closed = connection.outgoing(Message::Close(Some(CloseFrame { code: 1002, reason: "x".into() })));
        let Some(Message::Close(Some(frame))) = closed else { panic!("{closed:?}") };
        assert_eq!((frame.code, frame.reason.as_str()), (4409, "Subscriber for a already exists"));
    }
}
