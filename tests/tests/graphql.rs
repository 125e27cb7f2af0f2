//! Black-box tests of GraphQL on the real server: queries (with `asOf` and
//! `minSeq`), mutations mirroring the commands, subscriptions over
//! WebSocket, and the limits that reject abusive queries before any resolver
//! runs.

use std::time::Duration;

use serde_json::{Value, json};
use tests::Server;

fn gql(server: &Server, query: &str, variables: Value) -> Value {
    let answer = server.post("/graphql", json!({ "query": query, "variables": variables }));
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.body
}

const CREATE: &str =
    r#"mutation($input: CreateTaskInput!) { createTask(input: $input) { taskId created seq headSeq } }"#;
const CLAIM: &str = r#"mutation($ns: String!) { claimSteps(input: { namespaces: [$ns], workerId: "gql-worker", max: 5 }) { steps { taskId step epoch attempt } } }"#;

#[test]
fn mutations_and_queries_drive_a_task_and_read_it_as_of_the_past() {
    let server = Server::start();
    let created = gql(&server, CREATE, json!({ "input": { "namespace": "gql", "handler": "h", "payload": {"k": 1} } }));
    let id = created["data"]["createTask"]["taskId"].as_str().unwrap().to_owned();
    let created_seq = created["data"]["createTask"]["seq"].as_u64().unwrap();
    let claimed = gql(&server, CLAIM, json!({ "ns": "gql" }));
    let step = &claimed["data"]["claimSteps"]["steps"][0];
    assert_eq!(step["taskId"], json!(id));
    let done = gql(
        &server,
        r#"mutation($id: String!, $epoch: Int!) { completeStep(taskId: $id, step: "main", input: { epoch: $epoch, result: {ok: true} }) { seq headSeq events { type } } }"#,
        json!({ "id": id, "epoch": step["epoch"] }),
    );
    let head = done["data"]["completeStep"]["headSeq"].as_u64().unwrap();
    assert_eq!(done["data"]["completeStep"]["events"][0]["type"], "step_completed");

    // Now, read-your-writes with minSeq, and as of the creation seq.
    let query = r#"query($id: String!, $asOf: String, $min: Int) { task(id: $id, asOf: $asOf, minSeq: $min) { state lastSeq steps { state attempts result } } }"#;
    let now = gql(&server, query, json!({ "id": id, "min": head }));
    assert_eq!(now["data"]["task"]["state"], "complete");
    assert_eq!(now["data"]["task"]["steps"][0]["result"], json!({"ok": true}));
    let past = gql(&server, query, json!({ "id": id, "asOf": created_seq.to_string() }));
    assert_eq!(past["data"]["task"]["state"], "pending");
    assert_eq!(past["data"]["task"]["lastSeq"], json!(created_seq));
    assert_eq!(past["data"]["task"]["steps"][0]["attempts"], json!(0));

    let history =
        gql(&server, r#"query($id: String!) { taskHistory(id: $id) { seq type actor } }"#, json!({ "id": id }));
    let types: Vec<&str> =
        history["data"]["taskHistory"].as_array().unwrap().iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["task_created", "step_claimed", "step_completed"]);
    let ledger = gql(&server, "{ ledger { headSeq headHash } }", json!({}));
    assert_eq!(ledger["data"]["ledger"]["headSeq"], json!(head));
    assert_eq!(ledger["data"]["ledger"]["headHash"].as_str().unwrap().len(), 64);
    let missing = gql(&server, r#"{ task(id: "0190d6d0-0000-7000-8000-000000000000") { state } }"#, json!({}));
    assert_eq!(missing["data"]["task"], Value::Null);
}

#[test]
fn the_queue_can_be_read_now_and_as_of_a_past_seq() {
    let server = Server::start();
    for _ in 0..3 {
        gql(&server, CREATE, json!({ "input": { "namespace": "qv", "handler": "h" } }));
    }
    let before_claim = server.head_seq();
    gql(&server, CLAIM, json!({ "ns": "qv" }));
    let query =
        r#"query($asOf: String) { queue(namespace: "qv", asOf: $asOf, first: 2) { steps { state } nextCursor seq } }"#;
    let now = gql(&server, query, json!({}));
    let states: Vec<&str> =
        now["data"]["queue"]["steps"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["in_progress", "in_progress"]);
    assert_eq!(now["data"]["queue"]["nextCursor"], "2");
    let past = gql(&server, query, json!({ "asOf": before_claim.to_string() }));
    let states: Vec<&str> =
        past["data"]["queue"]["steps"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["enqueued", "enqueued"]);
    assert_eq!(past["data"]["queue"]["seq"], json!(before_claim));
}

#[test]
fn errors_carry_stable_codes_and_abusive_queries_are_refused_before_resolvers_run() {
    let server = Server::start();
    let head = server.head_seq();
    let bad = gql(&server, CREATE, json!({ "input": { "namespace": "BAD", "handler": "h" } }));
    assert_eq!(bad["errors"][0]["extensions"]["code"], "invalid_value");
    assert_eq!(bad["errors"][0]["extensions"]["field"], "namespace");

    let deep = format!(
        "{{ __schema {{ types {{ fields {{ type {{ {} name {} }} }} }} }} }}",
        "ofType { ".repeat(12),
        "} ".repeat(12)
    );
    let answer = server.post("/graphql", json!({ "query": deep }));
    let message = answer.body["errors"][0]["message"].as_str().unwrap_or("").to_lowercase();
    assert!(message.contains("nested too deep"), "{answer:?}");
    assert_eq!(answer.body["data"], Value::Null);
    let aliases: String = (0..100).map(|i| format!("a{i}: ledger {{ headSeq }} ")).collect();
    let answer = server.post("/graphql", json!({ "query": format!("{{ {aliases} }}") }));
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["errors"][0]["extensions"]["code"], "too_many_aliases");
    let cycle = server.post(
        "/graphql",
        json!({ "query": "query { ...A } fragment A on QueryRoot { ...B } fragment B on QueryRoot { ...A }" }),
    );
    assert!(cycle.body["errors"].as_array().is_some_and(|e| !e.is_empty()), "{cycle:?}");
    let nested = format!("{{ taskHistory(id: \"x\") {{ {} }} }}", "seq ".repeat(3000));
    let complex = server.post("/graphql", json!({ "query": nested }));
    assert!(complex.body["errors"].as_array().is_some_and(|e| !e.is_empty()), "{complex:?}");
    let unauthenticated = server.post_as("nope", "/graphql", json!({ "query": "{ ledger { headSeq } }" }), None);
    assert_eq!(unauthenticated.body["errors"][0]["extensions"]["code"], "unauthorized");
    assert_eq!(server.head_seq(), head, "nothing was written");
}

#[test]
fn a_subscription_over_websocket_receives_live_events() {
    let server = Server::start();
    let url = server.base.replace("http://", "ws://") + "/graphql/ws";
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
    let addr = server.base.trim_start_matches("http://").to_owned();
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut socket, _) = tungstenite::client(request, stream).unwrap();
    let send = |socket: &mut tungstenite::WebSocket<std::net::TcpStream>, value: Value| {
        socket.send(tungstenite::Message::Text(value.to_string().into())).unwrap();
    };
    send(
        &mut socket,
        json!({ "type": "connection_init", "payload": { "Authorization": format!("Bearer {}", server.token) } }),
    );
    let ack: Value = serde_json::from_str(socket.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(ack["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "id": "1", "type": "subscribe", "payload": { "query": "subscription { events(types: [\"task_created\"]) { seq type stream } }" } }),
    );
    std::thread::sleep(Duration::from_millis(200));
    gql(&server, CREATE, json!({ "input": { "namespace": "live", "handler": "h" } }));
    let next: Value = loop {
        let message = socket.read().unwrap();
        let value: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
        if value["type"] == "next" {
            break value;
        }
    };
    assert_eq!(next["payload"]["data"]["events"]["type"], "task_created");
    assert_eq!(next["payload"]["data"]["events"]["seq"], json!(1));
}

#[test]
fn graphiql_is_served_to_browsers() {
    let server = Server::start();
    let (status, page) = server.get_text("/graphql");
    assert_eq!(status, 200);
    assert!(page.contains("graphiql"), "{page}");
}
