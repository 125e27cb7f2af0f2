//! Every error the API returns, and the one place where errors become HTTP.
//! Body: `{"error": {"code": "...", "message": "...", "field": ...}}` with a
//! stable `code`. Classification follows STYLE.md: a caller's mistake is a
//! 4xx with a stable code, a conflict is 409, overload is 503 with
//! Retry-After, a full disk is 507 (`insufficient_storage`), an internal
//! fault is 500 and is logged.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::{Rejection, RejectionCode};
use eventlog::WriteError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds a client should wait before retrying (503).
    pub retry_after_s: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after_s: None }
    }
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after_s: u32) -> Self {
        Self { retry_after_s: Some(retry_after_s), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message) }
    }

    /// 507 `storage_low`: the data directory's disk is under its free-space floor, and nothing
    /// was done; retried once space is freed.
    pub fn storage_low(message: impl Into<String>) -> Self {
        Self { retry_after_s: Some(30), ..Self::new(StatusCode::INSUFFICIENT_STORAGE, "storage_low", message) }
    }

    /// 413 `body_too_large`, naming the limit (axum's message, "Failed to buffer the request
    /// body: length limit exceeded", named none: found by a black-box check).
    pub fn body_too_large(max_body_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over the limit of {max_body_bytes} bytes (--max-body-bytes)"),
        )
    }
}

/// The HTTP status of each domain rejection code.
pub fn rejection_status(code: RejectionCode) -> StatusCode {
    match code {
        RejectionCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        RejectionCode::TaskNotFound | RejectionCode::StepNotFound => StatusCode::NOT_FOUND,
        RejectionCode::LeaseLost | RejectionCode::InvalidState | RejectionCode::TaskExists => StatusCode::CONFLICT,
        RejectionCode::NamespaceForbidden => StatusCode::FORBIDDEN,
        RejectionCode::InvalidValue
        | RejectionCode::NoSteps
        | RejectionCode::TooManySteps
        | RejectionCode::DuplicateStep
        | RejectionCode::UnknownDependency
        | RejectionCode::DependencyCycle
        | RejectionCode::InvalidLease
        | RejectionCode::InvalidRetryPolicy
        | RejectionCode::InvalidBatch
        | RejectionCode::InvalidClaim => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        ApiError {
            status: rejection_status(r.code),
            code: r.code.as_str(),
            message: r.message,
            field: r.field,
            retry_after_s: None,
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Rejected(r) => r.into(),
            WriteError::Overloaded => ApiError::unavailable("overloaded", "the ledger is busy; retry shortly", 1),
            WriteError::Unavailable(reason) => ApiError::unavailable(
                "writes_unavailable",
                format!("the ledger is not accepting writes ({reason}); reads still work"),
                30,
            ),
            WriteError::CommitFailed(reason) => {
                tracing::error!(%reason, "commit failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "commit_failed",
                    "the command could not be committed: it was not applied, though it may be found in the log after a \
                     restart; retry with the same command id",
                )
            }
            // Not a fault of the request or of the code: the operator must free space and
            // restart. 507 says exactly that, and the stable code lets clients tell it apart
            // from an internal fault; later commands get 503 `writes_unavailable` until then.
            WriteError::StorageFull(reason) => {
                tracing::error!(%reason, "commit failed: the disk is full");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "the ledger's disk is full: the command was not recorded (or, rarely, only after a restart), and \
                     writes stop until the server is restarted with free space; reads still work",
                )
            }
            // Nothing was written and nothing failed: the writer takes commands again once space
            // is freed, so unlike a full disk this says when to retry.
            WriteError::StorageLow(reason) => ApiError::storage_low(reason),
            WriteError::InvalidEnvelope(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_command_id", message)
            }
            WriteError::Forbidden => ApiError::forbidden("system commands are issued by the ledger itself"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Shed load, "not ready yet" and the disk's floor are answers by design, counted in the
        // metrics: an ERROR line each (hundreds a second under the floor, just when the disk is
        // scarce: found by a black-box check) would only flood the log.
        let by_design = self.status == StatusCode::SERVICE_UNAVAILABLE || self.code == "storage_low";
        if self.status.is_server_error() && !by_design {
            // `error`, not `message`: that is the event's own field (a JSON log line had it twice).
            tracing::error!(code = self.code, error = %self.message, "request failed");
        }
        count_error_answer(self.status, self.code);
        let body = Body { error: Inner { code: self.code, message: &self.message, field: self.field.as_deref() } };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Error answers since the start, by status and code (`taskledger_http_errors_total`): every
/// error answer with a code, those refused before reaching the writer (malformed JSON, a bad
/// token, a route that does not exist) included. A few dozen codes, one increment per error.
static ERROR_ANSWERS: Mutex<BTreeMap<(u16, &'static str), u64>> = Mutex::new(BTreeMap::new());

/// Counts one error answer.
pub fn count_error_answer(status: StatusCode, code: &'static str) {
    *ERROR_ANSWERS.lock().unwrap_or_else(PoisonError::into_inner).entry((status.as_u16(), code)).or_default() += 1;
}

/// The error answers counted so far, by (status, code).
pub fn error_answers() -> Vec<((u16, &'static str), u64)> {
    ERROR_ANSWERS.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(key, n)| (*key, *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_of(error: WriteError) -> (StatusCode, &'static str, Option<String>) {
        let api = ApiError::from(error);
        let code = api.code;
        let response = api.into_response();
        let retry_after = response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
        (response.status(), code, retry_after)
    }

    #[test]
    fn a_full_disk_is_507_insufficient_storage_not_an_internal_fault() {
        let (status, code, retry_after) = response_of(WriteError::StorageFull("I/O error: no space left".into()));
        assert_eq!((status.as_u16(), code), (507, "insufficient_storage"));
        assert_eq!(retry_after, None, "retrying will not help until the operator frees space");
        let message = ApiError::from(WriteError::StorageFull("x".into())).message;
        assert!(message.contains("disk is full") && message.contains("not recorded"), "{message}");
    }

    #[test]
    fn every_writer_error_has_its_status_and_stable_code() {
        let cases = [
            (WriteError::Overloaded, 503, "overloaded", Some("1")),
            (WriteError::Unavailable("commit failed".into()), 503, "writes_unavailable", Some("30")),
            (WriteError::CommitFailed("I/O error".into()), 500, "commit_failed", None),
            (WriteError::StorageFull("no space".into()), 507, "insufficient_storage", None),
            (WriteError::InvalidEnvelope("empty".into()), 400, "invalid_command_id", None),
            (WriteError::Forbidden, 403, "forbidden", None),
            (WriteError::Rejected(Rejection::new(RejectionCode::LeaseLost, None, "stale")), 409, "lease_lost", None),
        ];
        for (error, status, code, retry_after) in cases {
            let what = format!("{error:?}");
            let got = response_of(error);
            assert_eq!((got.0.as_u16(), got.1, got.2.as_deref()), (status, code, retry_after), "{what}");
        }
    }
}
