//! What the command-line tools (`taskledger`, `taskledger-replay`) share in how they speak to
//! an operator: every binary of the workspace depends on this crate.

/// An error and its causes, `a: b: c`, each said once: some causes already print their own
/// source in their message, which anyhow's `{:#}` would then print again (sqlx and redb errors
/// do; a replay error repeated its cause three or four times: found by a black-box check).
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if out.contains(&message) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&message);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn a_cause_its_context_already_said_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("open db: {0}")]
        struct Open(#[source] std::io::Error);
        let io = std::io::Error::other("locked");
        let error = anyhow::Error::new(Open(io)).context("start");
        assert_eq!(format!("{error:#}"), "start: open db: locked: locked");
        assert_eq!(error_chain(&error), "start: open db: locked");
    }
}
