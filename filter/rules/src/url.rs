//! URL helpers the rules share: absolute http(s) URLs as the mirror accepts them, and
//! query-value encoding.

use std::borrow::Cow;

/// Parts of an `http(s)` URL the mirror needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    /// `https` or `http` (lowercase).
    pub scheme: String,
    /// Lowercase host with non-default port.
    pub authority: String,
    /// Path (may be empty).
    pub path: String,
    /// Query without `?`.
    pub query: Option<String>,
}

/// Is this byte acceptable in a path or query we forward?
pub fn is_url_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'#'
}

/// Parses an absolute `http://` or `https://` URL; fragment dropped. Rejects
/// userinfo, non-printable or non-ASCII characters, and invalid hosts.
pub fn parse_url(url: &str) -> Option<UrlParts> {
    parse_url_ref(url).map(|u| UrlParts {
        scheme: u.scheme.to_string(),
        authority: u.authority.into_owned(),
        path: u.path.to_string(),
        query: u.query.map(str::to_string),
    })
}

/// [`UrlParts`] as slices of the URL (the authority copied only to lowercase it), for
/// callers that only read them: a challenge's realm is parsed on every 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UrlRef<'a> {
    /// `https` or `http`.
    pub scheme: &'static str,
    /// Lowercase host with non-default port.
    pub authority: Cow<'a, str>,
    /// Path (may be empty).
    pub path: &'a str,
    /// Query without `?`.
    pub query: Option<&'a str>,
}

/// Index of the first `b` in `s`, else its length. A plain loop: the strings are short
/// and `memchr`'s word-at-a-time set-up costs more than it saves, in wasm most.
pub(crate) fn find_byte(s: &str, b: u8) -> usize {
    s.bytes().position(|c| c == b).unwrap_or(s.len())
}

/// [`parse_url`] without copying.
pub(crate) fn parse_url_ref(url: &str) -> Option<UrlRef<'_>> {
    // Neither scheme holds a `:`: the first `://` follows it exactly when the URL starts so.
    let starts = |p: &str| {
        url.get(..p.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(p))
    };
    let (scheme, default_port, rest) = if starts("https://") {
        ("https", "443", url.get(8..)?)
    } else if starts("http://") {
        ("http", "80", url.get(7..)?)
    } else {
        return None;
    };
    let rest = rest.get(..find_byte(rest, b'#')).unwrap_or(rest);
    let end = rest
        .bytes()
        .position(|b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(end);
    // A port is digits or invalid: comparing it before lowercasing is the same.
    let auth = match auth.split_once(':') {
        Some((h, p)) if p == default_port => h,
        _ => auth,
    };
    let auth: Cow<'_, str> = if auth.bytes().any(|b| b.is_ascii_uppercase()) {
        auth.to_ascii_lowercase().into()
    } else {
        auth.into()
    };
    if !crate::hosts::is_valid_authority(&auth) {
        return None;
    }
    if !tail.bytes().all(is_url_char) {
        return None;
    }
    let q = find_byte(tail, b'?');
    let (path, query) = (tail.get(..q)?, tail.get(q + 1..));
    Some(UrlRef {
        scheme,
        authority: auth,
        path,
        query,
    })
}

/// Decodes a query value: `%XX` and `+` (space). Strict: bad escapes or non-UTF-8 fail.
pub fn decode_query_value(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let h = b.get(i + 1..i + 3)?;
                let h = std::str::from_utf8(h).ok()?;
                if !h.bytes().all(|x| x.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes a query value. Unreserved characters and `,*()` stay; `:` and `/` stay
/// unless `encode_delims` (then `%3A`, `%2F`, as Go's `url.Values` writes them);
/// everything else (space included) becomes `%XX`.
pub fn encode_query_value(s: &str, encode_delims: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || b"-._~,*()".contains(&b)
            || (!encode_delims && (b == b':' || b == b'/'));
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// [`parse_url`] written with copies at each step, as it was before it borrowed.
    fn parse_url_reference(url: &str) -> Option<UrlParts> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => "443",
            "http" => "80",
            _ => return None,
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (auth, tail) = rest.split_at(end);
        let auth = auth.to_ascii_lowercase();
        let auth = match auth.split_once(':') {
            Some((h, p)) if p == default_port => h.to_string(),
            _ => auth,
        };
        if !crate::hosts::is_valid_authority(&auth) || !tail.bytes().all(is_url_char) {
            return None;
        }
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (tail.to_string(), None),
        };
        Some(UrlParts {
            scheme,
            authority: auth,
            path,
            query,
        })
    }

    proptest! {
        #[test]
        fn borrowed_parse_agrees_with_the_copying_one(
            scheme in "(https?|HTTPS|Http|ftp|)",
            sep in "(://|:/|)",
            host in "[a-zA-Z0-9.:@-]{0,12}",
            port in "(|:443|:80|:8443|:0|:x)",
            tail in "[a-zA-Z0-9/?#=& %.é-]{0,16}",
        ) {
            let url = format!("{scheme}{sep}{host}{port}{tail}");
            prop_assert_eq!(parse_url(&url), parse_url_reference(&url), "{}", url);
        }
    }

    #[test]
    fn urls() {
        let u = parse_url("HTTPS://Host.Example:443/a/b?c=d#frag").unwrap();
        assert_eq!(u.authority, "host.example");
        assert_eq!(u.path, "/a/b");
        assert_eq!(u.query.as_deref(), Some("c=d"));
        let u = parse_url("https://h:8443").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str(), u.query),
            ("h:8443", "", None)
        );
        assert!(parse_url("https://h/a b").is_none());
        assert!(parse_url("https://h/é").is_none());
    }

    #[test]
    fn decoding_and_encoding() {
        assert_eq!(
            decode_query_value("repository%3Aquay.io%2Fa%3Apull").as_deref(),
            Some("repository:quay.io/a:pull")
        );
        assert_eq!(decode_query_value("a+b%20c").as_deref(), Some("a b c"));
        for bad in ["%", "%4", "%zz", "%+1", "%ff", "a%c3"] {
            assert_eq!(decode_query_value(bad), None, "{bad}");
        }
        assert_eq!(
            encode_query_value("repository:a/b:pull,push x&y", true),
            "repository%3Aa%2Fb%3Apull,push%20x%26y"
        );
        assert_eq!(
            encode_query_value("repository:a/b:*", false),
            "repository:a/b:*"
        );
    }
}
