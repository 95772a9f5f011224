//! OCI distribution error bodies.

use serde::Serialize;

/// Error codes the filter emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Method or path not supported.
    Unsupported,
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
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unsupported => "UNSUPPORTED",
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
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Entry<'a>; 1],
}

/// Renders `{"errors":[{"code":..,"message":..,"detail":..}]}`.
pub fn render(code: ErrorCode, message: &str, detail: Option<&serde_json::Value>) -> String {
    let body = Body {
        errors: [Entry {
            code: code.as_str(),
            message,
            detail,
        }],
    };
    serde_json::to_string(&body).unwrap_or_else(|_| {
        format!(
            "{{\"errors\":[{{\"code\":\"{}\",\"message\":\"error\"}}]}}",
            code.as_str()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_escapes() {
        let s = render(ErrorCode::NameInvalid, "bad \"name\"\n", None);
        assert_eq!(
            s,
            r#"{"errors":[{"code":"NAME_INVALID","message":"bad \"name\"\n"}]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["errors"][0]["message"], "bad \"name\"\n");
        let d = serde_json::json!({"name": "x"});
        let s = render(ErrorCode::Denied, "no", Some(&d));
        assert_eq!(
            s,
            r#"{"errors":[{"code":"DENIED","message":"no","detail":{"name":"x"}}]}"#
        );
    }
}
