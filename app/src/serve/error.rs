//! Errors in the shape OpenAI's API answers them: `{"error": {"message", "type", "param",
//! "code"}}` with the matching HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_runtime::error::FerryError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// OpenAI's `code` (`model_not_found`, `context_length_exceeded`).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None }
    }

    /// 400, naming the request field at fault.
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: param.map(str::to_string), code: None }
    }

    /// 413: the prompt is beyond the context.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self { code: Some("context_length_exceeded"), ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, message) }
    }

    /// 404: a model this server does not serve.
    pub fn unknown_model(name: &str, served: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!("model {name:?} is not served here; this server serves {served:?}"),
            )
        }
    }

    /// A generation that could not start or failed, by cause.
    pub fn from_ferry(err: &FerryError) -> Self {
        let status = match err {
            FerryError::ContextExceeded { .. } | FerryError::ContextBeyondReserve { .. } => {
                return Self::too_large(err.to_string());
            }
            FerryError::TokenOutOfRange { .. } | FerryError::Empty(_) | FerryError::Template(_) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, err.to_string())
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "server_overloaded",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object (also sent as a server-sent event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
