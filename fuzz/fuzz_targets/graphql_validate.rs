//! Fuzz target: GraphQL query text against the server's real schema
//! (`api::graphql`'s `QueryRoot`, `MutationRoot`, `SubscriptionRoot`) with
//! the server's limits — depth, complexity, recursion, directives — and the
//! handler's alias limit. An extension ends every request after validation,
//! so no resolver runs (they need a running writer): what is fuzzed is the
//! parser and validation, the part that sees a query before anything is
//! checked. The bracket nesting and token count on the text, then the alias count, nesting
//! and expanded size are the server's own (`api::graphql::lexical_checks` and
//! `document_limits`, which its schema applies as an extension).
//! Nothing may panic, hang or allocate without bound.

#![no_main]

use std::sync::{Arc, LazyLock};

use api::graphql::{
    COMPLEXITY_MAX, DEPTH_MAX, DIRECTIVES_MAX, MutationRoot, QueryRoot, RECURSIVE_DEPTH_MAX, SubscriptionRoot,
    document_limits, lexical_checks, single_root_field,
};
use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextExecute};
use async_graphql::{Response, Schema, ServerError};
use libfuzzer_sys::fuzz_target;

/// Answers every validated request with this error instead of executing it.
const VALIDATED: &str = "validated; not executed";

struct StopBeforeExecute;

impl ExtensionFactory for StopBeforeExecute {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(StopBeforeExecute)
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for StopBeforeExecute {
    async fn execute(&self, _ctx: &ExtensionContext<'_>, _name: Option<&str>, _next: NextExecute<'_>) -> Response {
        Response::from_errors(vec![ServerError::new(VALIDATED, None)])
    }
}

type FuzzSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// Built like `api::graphql::schema`, less the state the resolvers read.
static SCHEMA: LazyLock<FuzzSchema> = LazyLock::new(|| {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .limit_depth(DEPTH_MAX)
        .limit_complexity(COMPLEXITY_MAX)
        .limit_recursive_depth(RECURSIVE_DEPTH_MAX)
        .limit_directives(DIRECTIVES_MAX)
        .extension(StopBeforeExecute)
        .finish()
});

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    // The server's order: its `DocumentLimits` extension refuses brackets nested too deep or too
    // many tokens before anything parses the text, then too many aliases, too deep a nesting or
    // too many selections once fragments are expanded, then the schema's checks.
    if lexical_checks(query).is_err() {
        return;
    }
    let Ok(document) = async_graphql::parser::parse_query(query) else { return };
    if document_limits(&document).is_err() || single_root_field(&document).is_err() {
        return;
    }
    let response = futures_executor::block_on(SCHEMA.execute(query));
    // Refused (some validation error), or validated and stopped: never executed.
    assert!(!response.errors.is_empty(), "a request ran past the extension that stops it");
});
