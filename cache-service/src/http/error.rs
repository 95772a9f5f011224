//! The one place where domain errors become HTTP responses (OCI error JSON).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::cache::CacheError;
use registry_rules::names::NameError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }
    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    pub fn unsupported() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this is a read-only pull-through cache",
        )
        .with_header(header::ALLOW, "GET, HEAD")
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "unknown path")
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        let (code, message) = match e {
            NameError::Name => ("NAME_INVALID", "invalid repository name"),
            NameError::Tag => ("MANIFEST_INVALID", "invalid tag"),
            // The cache's own rule (see `oci::require_sha256`), said to the client.
            NameError::Digest => (
                "DIGEST_INVALID",
                "invalid digest (only sha256:<64 lowercase hex> is accepted)",
            ),
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            CacheError::UnknownRegistry(_) => ApiError::new(S::NOT_FOUND, "NAME_UNKNOWN", msg),
            CacheError::ManifestUnknown => ApiError::new(S::NOT_FOUND, "MANIFEST_UNKNOWN", msg),
            CacheError::BlobUnknown => ApiError::new(S::NOT_FOUND, "BLOB_UNKNOWN", msg),
            CacheError::NameUnknown => ApiError::new(S::NOT_FOUND, "NAME_UNKNOWN", msg),
            CacheError::Unauthorized => ApiError::new(S::UNAUTHORIZED, "UNAUTHORIZED", msg),
            CacheError::Denied => ApiError::new(S::FORBIDDEN, "DENIED", msg),
            CacheError::TooManyRequests { retry_after } => {
                let mut a = ApiError::new(S::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", msg);
                if let Some(r) = retry_after {
                    a = a.with_header(header::RETRY_AFTER, r);
                }
                a
            }
            CacheError::UpstreamStatus(_) => ApiError::new(S::BAD_GATEWAY, "UNAVAILABLE", msg),
            CacheError::Upstream(_) => ApiError::new(S::BAD_GATEWAY, "UNAVAILABLE", msg),
            CacheError::ManifestInvalid(_) => {
                ApiError::new(S::BAD_GATEWAY, "MANIFEST_INVALID", msg)
            }
            CacheError::DigestMismatch(_) => ApiError::new(S::BAD_GATEWAY, "DIGEST_INVALID", msg),
            CacheError::TooLarge => ApiError::new(S::BAD_GATEWAY, "SIZE_INVALID", msg),
            CacheError::Storage(_) | CacheError::Internal(_) => {
                ApiError::new(S::INTERNAL_SERVER_ERROR, "INTERNAL", msg)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": null }]
        })
        .to_string();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
        resp
    }
}
