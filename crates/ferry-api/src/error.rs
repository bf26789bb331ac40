use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::types::{ErrorBody, ErrorDetail};

/// An operation's failure, as the API reports it: a code, and one line that names the
/// object and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (duplicate name, no room…).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed or asks for something invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No valid token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The token's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The request body is over the limit for its route.
    #[error("{0}")]
    TooLarge(String),
    /// The caller holds too much already (open streams).
    #[error("{0}")]
    TooManyRequests(String),
    /// A dependency (etcd, another host) is not reachable.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooLarge(_) => "too_large",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Rebuilds an error from a response body (the client side).
    pub fn from_body(status: u16, body: &ErrorBody) -> ApiError {
        let message = body.error.message.clone();
        match body.error.code.as_str() {
            "not_found" => ApiError::NotFound(message),
            "conflict" => ApiError::Conflict(message),
            "bad_request" => ApiError::BadRequest(message),
            "unauthorized" => ApiError::Unauthorized,
            "forbidden" => ApiError::Forbidden(message),
            "too_large" => ApiError::TooLarge(message),
            "too_many_requests" => ApiError::TooManyRequests(message),
            "unavailable" => ApiError::Unavailable(message),
            _ => ApiError::Internal(format!("HTTP {status}: {message}")),
        }
    }
}

impl From<ferry_store::StoreError> for ApiError {
    fn from(error: ferry_store::StoreError) -> Self {
        match error {
            ferry_store::StoreError::Etcd { .. } => ApiError::Unavailable(error.to_string()),
            ferry_store::StoreError::Exists { .. } | ferry_store::StoreError::Conflict { .. } => {
                ApiError::Conflict(error.to_string())
            }
            _ => ApiError::Internal(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
            },
        };
        (self.status(), Json(body)).into_response()
    }
}
