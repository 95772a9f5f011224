//! The one place where the cache's domain errors become HTTP responses; the codes and the
//! JSON body are the shared `registry_rules::oci_error`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::range::RangeError;
use super::MAX_TAGS_N;
use crate::authorize::{Refusal, RelayError};
use crate::cache::CacheError;
use registry_rules::names::NameError;
use registry_rules::oci_error::{render, ErrorCode};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
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
            ErrorCode::Unsupported,
            "this is a read-only pull-through cache",
        )
        .with_header(header::ALLOW, "GET, HEAD")
    }
    /// A failure on the cache's own side (500 `INTERNAL`).
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    }
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            "unknown path",
        )
    }
}

/// What the router finds wrong with a request before the cache is asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("percent-encoded characters are not allowed in repository paths")]
    PercentEncoded,
    #[error("token requests are GET")]
    TokenNotGet,
    #[error(
        "this registry's clients do not log in at the upstream (client_auth is not \"upstream\")"
    )]
    NoUpstreamLogin,
    #[error("n must be an integer between 0 and {MAX_TAGS_N}")]
    Pagination,
    /// `size`, when known, is said in `Content-Range` of a 416.
    #[error("{error}")]
    Range {
        error: RangeError,
        size: Option<u64>,
    },
    #[error("the manifest is {0}, which the request's Accept header does not allow")]
    NotAccepted(String),
}

impl RequestError {
    pub fn range(error: RangeError, size: Option<u64>) -> Self {
        Self::Range { error, size }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        use ErrorCode as C;
        use RequestError as E;
        use StatusCode as S;
        let (status, code) = match &e {
            E::PercentEncoded => (S::BAD_REQUEST, C::NameInvalid),
            E::TokenNotGet => (S::METHOD_NOT_ALLOWED, C::Unsupported),
            E::NoUpstreamLogin => (S::NOT_FOUND, C::NameUnknown),
            E::Pagination => (S::BAD_REQUEST, C::PaginationNumberInvalid),
            E::Range {
                error: RangeError::Malformed,
                ..
            } => (S::BAD_REQUEST, C::RangeInvalid),
            E::Range {
                error: RangeError::Unsatisfiable,
                ..
            } => (S::RANGE_NOT_SATISFIABLE, C::RangeInvalid),
            E::NotAccepted(_) => (S::NOT_FOUND, C::ManifestUnknown),
        };
        let api = ApiError::new(status, code, e.to_string());
        match e {
            E::TokenNotGet => api.with_header(header::ALLOW, "GET"),
            E::Range {
                error: RangeError::Unsatisfiable,
                size: Some(size),
            } => api.with_header(header::CONTENT_RANGE, format!("bytes */{size}")),
            _ => api,
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        let (code, message) = match e {
            NameError::Name => (ErrorCode::NameInvalid, "invalid repository name"),
            NameError::Tag => (ErrorCode::ManifestInvalid, "invalid tag"),
            // Includes the cache's own sha256-only rule (`oci::parse_digest`), said to the client.
            NameError::Digest => (
                ErrorCode::DigestInvalid,
                "invalid digest (only sha256:<64 lowercase hex> is accepted)",
            ),
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        use CacheError as E;
        use ErrorCode as C;
        use StatusCode as S;
        let (status, code) = match &e {
            E::UnknownRegistry(_) | E::NameUnknown => (S::NOT_FOUND, C::NameUnknown),
            E::ManifestUnknown => (S::NOT_FOUND, C::ManifestUnknown),
            E::BlobUnknown => (S::NOT_FOUND, C::BlobUnknown),
            // The upstream refused the credential the cache fetched with. A 401 must carry a
            // challenge (RFC 9110), and logging in again at the mirror would not change the
            // cache's credential: the client is denied. (A client's own refused credential is
            // a `Refusal`, answered with the upstream's challenge.)
            E::Unauthorized | E::Denied => (S::FORBIDDEN, C::Denied),
            E::TooManyRequests { .. } => (S::TOO_MANY_REQUESTS, C::TooManyRequests),
            E::UpstreamStatus(_) | E::Upstream(_) => (S::BAD_GATEWAY, C::Unavailable),
            E::ManifestInvalid(_) => (S::BAD_GATEWAY, C::ManifestInvalid),
            E::DigestMismatch(_) => (S::BAD_GATEWAY, C::DigestInvalid),
            E::TooLarge => (S::BAD_GATEWAY, C::SizeInvalid),
            E::Busy => (S::SERVICE_UNAVAILABLE, C::Unavailable),
            E::Storage(_) | E::Internal(_) => return ApiError::internal(e),
        };
        let api = ApiError::new(status, code, e.to_string());
        match e {
            E::TooManyRequests {
                retry_after: Some(r),
            } => api.with_header(header::RETRY_AFTER, r),
            E::Busy => api.with_header(header::RETRY_AFTER, "1".to_owned()),
            _ => api,
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let message = r.to_string();
        let with = |mut e: ApiError, challenges: Vec<String>| {
            for c in challenges {
                e = e.with_header(header::WWW_AUTHENTICATE, c);
            }
            e
        };
        match r {
            Refusal::Unauthorized { challenges } => with(
                ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message),
                challenges,
            ),
            Refusal::Denied { challenges } => with(
                ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, message),
                challenges,
            ),
            Refusal::NotFound(code) => ApiError::new(StatusCode::NOT_FOUND, code, message),
            Refusal::TooManyRequests { retry_after } => {
                let e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::TooManyRequests,
                    message,
                );
                match retry_after {
                    Some(r) => e.with_header(header::RETRY_AFTER, r),
                    None => e,
                }
            }
            Refusal::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                message,
            ),
        }
    }
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        let (status, code) = match e {
            RelayError::NotIssued(_) | RelayError::NoRealm | RelayError::Insecure(_) => {
                (StatusCode::FORBIDDEN, ErrorCode::Denied)
            }
            RelayError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            RelayError::TooLarge => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = render(self.code, &self.message);
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
        // Appended: an upstream's challenges may be several `WWW-Authenticate` values.
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.append(k, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router's refusals keep the headers a client acts on: where a range can start
    /// (416) and which method a token request takes (405).
    #[test]
    fn a_refused_request_says_what_the_client_can_do_instead() {
        let header_of = |e: RequestError, name: header::HeaderName| {
            let resp = ApiError::from(e).into_response();
            let value = resp.headers().get(name).map(|v| v.as_bytes().to_vec());
            (resp.status(), value)
        };
        assert_eq!(
            header_of(
                RequestError::range(RangeError::Unsatisfiable, Some(100)),
                header::CONTENT_RANGE
            ),
            (
                StatusCode::RANGE_NOT_SATISFIABLE,
                Some(b"bytes */100".to_vec())
            )
        );
        assert_eq!(
            header_of(
                RequestError::range(RangeError::Malformed, None),
                header::CONTENT_RANGE
            ),
            (StatusCode::BAD_REQUEST, None)
        );
        assert_eq!(
            header_of(RequestError::TokenNotGet, header::ALLOW),
            (StatusCode::METHOD_NOT_ALLOWED, Some(b"GET".to_vec()))
        );
    }

    /// An upstream's 401 to the cache's own fetch is no challenge the client could answer:
    /// a 403 without `WWW-Authenticate`, never a 401 without one.
    #[test]
    fn an_upstream_refusing_the_caches_credential_is_denied_not_a_bare_401() {
        let resp = ApiError::from(CacheError::Unauthorized).into_response();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert!(resp.headers().get(header::WWW_AUTHENTICATE).is_none());
    }

    /// A cache at its bound of fetches in progress tells the client to come back, in the
    /// registry protocol's words.
    #[test]
    fn a_busy_cache_answers_503_with_retry_after() {
        let resp = ApiError::from(CacheError::Busy).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert_eq!(
            resp.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
    }
}
