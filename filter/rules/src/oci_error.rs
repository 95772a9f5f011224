//! OCI distribution error bodies: the codes the filter and the cache answer with, the one
//! renderer of `{"errors":[...]}`, and a bounded reader of an upstream's error body.

use serde::Serialize;

/// Error codes the filter and the cache emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Method or path not supported.
    Unsupported,
    /// Blob unknown to the registry.
    BlobUnknown,
    /// Manifest unknown to the registry.
    ManifestUnknown,
    /// Manifest (or, at the cache, a tag) invalid.
    ManifestInvalid,
    /// Content larger than allowed or than declared.
    SizeInvalid,
    /// Byte range not satisfiable or malformed (the cache's own code).
    RangeInvalid,
    /// Invalid `n` of a tags list.
    PaginationNumberInvalid,
    /// Rate limited upstream.
    TooManyRequests,
    /// The cache failed on its own side (storage, a bug).
    Internal,
    /// Repository name invalid.
    NameInvalid,
    /// Repository or registry unknown.
    NameUnknown,
    /// Tag invalid.
    TagInvalid,
    /// Digest invalid.
    DigestInvalid,
    /// Access denied.
    Denied,
    /// Authentication required.
    Unauthorized,
    /// A service the mirror depends on is unavailable.
    Unavailable,
}

impl ErrorCode {
    /// Every code, in declaration order (what a counter per code iterates).
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::Unsupported,
        ErrorCode::BlobUnknown,
        ErrorCode::ManifestUnknown,
        ErrorCode::ManifestInvalid,
        ErrorCode::SizeInvalid,
        ErrorCode::RangeInvalid,
        ErrorCode::PaginationNumberInvalid,
        ErrorCode::TooManyRequests,
        ErrorCode::Internal,
        ErrorCode::NameInvalid,
        ErrorCode::NameUnknown,
        ErrorCode::TagInvalid,
        ErrorCode::DigestInvalid,
        ErrorCode::Denied,
        ErrorCode::Unauthorized,
        ErrorCode::Unavailable,
    ];

    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Entry<'a>; 1],
}

/// Renders `{"errors":[{"code":..,"message":..}]}`.
pub fn render(code: ErrorCode, message: &str) -> String {
    let body = Body {
        errors: [Entry {
            code: code.as_str(),
            message,
        }],
    };
    serde_json::to_string(&body).unwrap_or_else(|_| {
        format!(
            "{{\"errors\":[{{\"code\":\"{}\",\"message\":\"error\"}}]}}",
            code.as_str()
        )
    })
}

/// Longest error body [`parse_first`] reads: registries answer errors in a few hundred bytes.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
/// Most characters kept of an upstream's code or message (they end up in logs and terminals).
pub const MAX_ERROR_TEXT: usize = 512;

/// The first entry of an upstream's `{"errors":[...]}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstError {
    /// The code as sent (empty when missing), e.g. `MANIFEST_UNKNOWN`.
    pub code: String,
    /// The message as sent (empty when missing).
    pub message: String,
}

impl std::fmt::Display for FirstError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The first error of an OCI error body; `None` when the body is longer than
/// [`MAX_ERROR_BODY`], not JSON, or has no `errors` entry. Code and message are cut to
/// [`MAX_ERROR_TEXT`] characters with control characters dropped (no terminal escapes from a
/// hostile upstream).
pub fn parse_first(body: &[u8]) -> Option<FirstError> {
    if body.len() > MAX_ERROR_BODY {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let first = v.get("errors")?.as_array()?.first()?;
    let text = |key: &str| -> String {
        first
            .get(key)
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_ERROR_TEXT)
            .collect()
    };
    Some(FirstError {
        code: text("code"),
        message: text("message"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_escapes() {
        let s = render(ErrorCode::NameInvalid, "bad \"name\"\n");
        assert_eq!(
            s,
            r#"{"errors":[{"code":"NAME_INVALID","message":"bad \"name\"\n"}]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["errors"][0]["message"], "bad \"name\"\n");
    }

    #[test]
    fn all_lists_every_code_once() {
        // A new variant fails to compile here until it is added to `ALL` as well.
        let place = |c: ErrorCode| match c {
            ErrorCode::Unsupported => 0,
            ErrorCode::BlobUnknown => 1,
            ErrorCode::ManifestUnknown => 2,
            ErrorCode::ManifestInvalid => 3,
            ErrorCode::SizeInvalid => 4,
            ErrorCode::RangeInvalid => 5,
            ErrorCode::PaginationNumberInvalid => 6,
            ErrorCode::TooManyRequests => 7,
            ErrorCode::Internal => 8,
            ErrorCode::NameInvalid => 9,
            ErrorCode::NameUnknown => 10,
            ErrorCode::TagInvalid => 11,
            ErrorCode::DigestInvalid => 12,
            ErrorCode::Denied => 13,
            ErrorCode::Unauthorized => 14,
            ErrorCode::Unavailable => 15,
        };
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(place(code), i, "{}", code.as_str());
        }
    }

    #[test]
    fn every_code_renders_and_parses_back() {
        for code in ErrorCode::ALL {
            let body = render(code, "why");
            assert_eq!(
                parse_first(body.as_bytes()),
                Some(FirstError {
                    code: code.as_str().into(),
                    message: "why".into()
                })
            );
        }
    }

    #[test]
    fn first_error_is_bounded_and_tolerant() {
        let two = br#"{"errors":[{"code":"DENIED","message":"no"},{"code":"X","message":"y"}]}"#;
        let first = parse_first(two).unwrap();
        assert_eq!(first.to_string(), "DENIED: no");
        // Missing or non-string fields are empty, not a failure.
        let odd = br#"{"errors":[{"code":7,"detail":{}}]}"#;
        assert_eq!(parse_first(odd).map(|e| e.to_string()), Some(": ".into()));
        for none in [
            &b""[..],
            b"not json",
            b"<html>502</html>",
            b"{}",
            br#"{"errors":[]}"#,
            br#"{"errors":{}}"#,
        ] {
            assert_eq!(parse_first(none), None);
        }
        assert_eq!(
            parse_first(br#"{"errors":[1]}"#).map(|e| e.to_string()),
            Some(": ".into())
        );
        // Long and hostile text is cut and stripped of control characters.
        let long = format!(
            r#"{{"errors":[{{"code":"A\u001b[31m","message":"{}"}}]}}"#,
            "m".repeat(MAX_ERROR_TEXT * 2)
        );
        let e = parse_first(long.as_bytes()).unwrap();
        assert_eq!(e.code, "A[31m");
        assert_eq!(e.message.chars().count(), MAX_ERROR_TEXT);
        // A body past the bound is not parsed at all.
        let huge = format!(
            r#"{{"errors":[{{"code":"X","message":"{}"}}]}}"#,
            "m".repeat(MAX_ERROR_BODY)
        );
        assert_eq!(parse_first(huge.as_bytes()), None);
    }
}
