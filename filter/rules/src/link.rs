//! RFC 8288 `Link` values of a registry's answer (the `rel="next"` page of a tags or
//! referrers list), their targets put back where the client asked: a client resolves them
//! against the mirror, where the upstream's own path names the default registry.

use super::challenge::MAX_HEADER_LEN;
use super::route::{has_path_tricks, take_ns, with_query};
use super::url::{encode_query_value, find_byte, is_url_char, parse_url_ref};
use std::borrow::Cow;

/// Most links read from one value; a value with more is dropped.
pub const MAX_LINKS: usize = 16;

/// How the client reached the registry whose answer holds the links.
#[derive(Debug, Clone, Copy)]
pub struct ClientView<'a> {
    /// `<scheme>://<authority>` of the mirror as the client knows it.
    pub mirror_base: &'a str,
    /// The upstream's `host[:port]`: its absolute links are mapped onto the mirror.
    pub upstream: &'a str,
    /// The upstream path (with query) the links are relative to.
    pub upstream_path: &'a str,
    /// The registry component the client put in front of names (path-prefix mode).
    pub path_prefix: Option<&'a str>,
    /// The `ns` the client sent (decoded).
    pub ns: Option<&'a str>,
}

/// Result of [`rewrite_links`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenLinks {
    /// The new value: the original when nothing changed, empty when no link is left.
    pub value: String,
    /// Links whose target changed.
    pub rewritten: usize,
    /// Links removed (a target the mirror cannot serve); a value that does not parse, is
    /// longer than [`MAX_HEADER_LEN`] or holds more than [`MAX_LINKS`] counts as one.
    pub dropped: usize,
}

/// Maps every link target of `value` into the client's view: a `/v2/` path of the upstream
/// (relative, or absolute on the upstream's host) gets the client's path prefix and `ns`
/// back (an `ns` of the upstream's own is removed: it would pick another registry), on
/// the mirror. Any other target (another host, another path, dot segments) is dropped:
/// a client following it would leave the mirror or reach another registry. Link
/// parameters are kept as sent.
pub fn rewrite_links(value: &str, view: &ClientView<'_>) -> RewrittenLinks {
    let Some(links) = parse(value) else {
        return RewrittenLinks {
            value: String::new(),
            rewritten: 0,
            dropped: 1,
        };
    };
    let (mut rewritten, mut dropped) = (0, 0);
    let mut kept = Vec::with_capacity(links.len());
    for (target, params) in links {
        match map_target(target, view) {
            Some(t) => {
                if t != target {
                    rewritten += 1;
                }
                kept.push((t, params));
            }
            None => dropped += 1,
        }
    }
    if rewritten == 0 && dropped == 0 {
        return RewrittenLinks {
            value: value.to_string(),
            rewritten,
            dropped,
        };
    }
    let mut out = String::with_capacity(value.len() + rewritten * view.mirror_base.len());
    for (target, params) in kept {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push('<');
        out.push_str(&target);
        out.push('>');
        out.push_str(params);
    }
    RewrittenLinks {
        value: out,
        rewritten,
        dropped,
    }
}

/// The link-values of `value` as `(target, params)`, params (`;`-separated, quoted
/// strings and all) as sent; `None` when it is not a well-formed, bounded list.
pub(crate) fn parse(value: &str) -> Option<Vec<(&str, &str)>> {
    let visible = |b: u8| b == b'\t' || (0x20..0x7f).contains(&b);
    if value.len() > MAX_HEADER_LEN || !value.bytes().all(visible) {
        return None;
    }
    let mut links = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return Some(links);
        }
        let inner = rest.strip_prefix('<')?;
        let end = find_byte(inner, b'>');
        // `None` when there is no `>`: `end` is then the length.
        let after = inner.get(end + 1..)?;
        let target = inner.get(..end)?;
        // The params run to a comma outside a quoted-string.
        let (mut quoted, mut escaped, mut stop) = (false, false, after.len());
        for (i, b) in after.bytes().enumerate() {
            match (quoted, escaped, b) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (true, false, b'"') | (false, _, b'"') => quoted = !quoted,
                (false, _, b',') => {
                    stop = i;
                    break;
                }
                _ => {}
            }
        }
        let params = after.get(..stop)?;
        let starts = params.trim_start_matches([' ', '\t']);
        if quoted || !(starts.is_empty() || starts.starts_with(';')) || links.len() >= MAX_LINKS {
            return None;
        }
        links.push((target, params.trim_end_matches([' ', '\t'])));
        rest = after.get(stop..)?;
    }
}

/// Where a link target goes on the mirror; `None`: nowhere (dropped).
fn map_target<'a>(target: &'a str, view: &ClientView<'_>) -> Option<Cow<'a, str>> {
    if target.is_empty() {
        // The answer itself: the client's own URL, on the mirror.
        return Some(target.into());
    }
    if !target.bytes().all(is_url_char) || target.starts_with("//") {
        // Not a URL we pass on, or a network-path reference to some host.
        return None;
    }
    if target.starts_with('/') {
        return to_client(target, view).map(Cow::Owned);
    }
    if has_scheme(target) {
        let u = parse_url_ref(target).filter(|u| u.authority == view.upstream)?;
        let mut path = u.path.to_string();
        if let Some(q) = u.query {
            path.push('?');
            path.push_str(q);
        }
        return to_client(&path, view).map(|p| format!("{}{p}", view.mirror_base).into());
    }
    // Relative to the upstream request (`?last=…`, `list?last=…`): resolved there, so that
    // the client's `ns` comes back even on a query of its own.
    let base = view
        .upstream_path
        .get(..find_byte(view.upstream_path, b'?'))?;
    let resolved = if target.starts_with('?') {
        format!("{base}{target}")
    } else {
        let dir = base.get(..base.rfind('/')? + 1)?;
        format!("{dir}{target}")
    };
    to_client(&resolved, view).map(Cow::Owned)
}

/// `scheme ":"` at the start (RFC 3986): an absolute URL, not a relative reference.
fn has_scheme(target: &str) -> bool {
    target.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    })
}

/// An upstream `/v2/` path (with query) as the client names it: its path prefix after
/// `/v2/`, the upstream's `ns` replaced by the client's. `None` for any other path, or one
/// routing would refuse.
fn to_client(path_and_query: &str, view: &ClientView<'_>) -> Option<String> {
    let q = find_byte(path_and_query, b'?');
    let (path, query) = (path_and_query.get(..q)?, path_and_query.get(q + 1..));
    let name = path.strip_prefix("/v2/")?;
    if has_path_tricks(path) {
        return None;
    }
    // Routing reads the first `ns` (`take_ns`): the upstream's go, only the client's is put
    // back, last.
    let (_, mut query) = take_ns(query);
    if let Some(ns) = view.ns {
        let ns = format!("ns={}", encode_query_value(ns, true));
        query = Some(match query {
            Some(q) => format!("{q}&{ns}"),
            None => ns,
        });
    }
    let out = match view.path_prefix {
        Some(p) => format!("/v2/{p}/{name}"),
        None => format!("/v2/{name}"),
    };
    Some(with_query(out, query.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEXT: &str = r#"</v2/org/img/tags/list?last=x&n=50>; rel="next""#;

    fn view<'a>(path_prefix: Option<&'a str>, ns: Option<&'a str>) -> ClientView<'a> {
        ClientView {
            mirror_base: "https://m",
            upstream: "quay.io",
            upstream_path: "/v2/org/img/tags/list?n=50",
            path_prefix,
            ns,
        }
    }

    fn rewrite(value: &str, v: &ClientView<'_>) -> (String, usize, usize) {
        let r = rewrite_links(value, v);
        (r.value, r.rewritten, r.dropped)
    }

    #[test]
    fn path_prefix_and_ns_come_back() {
        let prefixed = view(Some("quay.io"), None);
        assert_eq!(
            rewrite(NEXT, &prefixed),
            (
                r#"</v2/quay.io/org/img/tags/list?last=x&n=50>; rel="next""#.into(),
                1,
                0
            )
        );
        let ns = view(None, Some("quay.io"));
        assert_eq!(
            rewrite(NEXT, &ns).0,
            r#"</v2/org/img/tags/list?last=x&n=50&ns=quay.io>; rel="next""#
        );
        // containerd's `override_path` sends both.
        let both = view(Some("quay.io"), Some("quay.io"));
        assert_eq!(
            rewrite(NEXT, &both).0,
            r#"</v2/quay.io/org/img/tags/list?last=x&n=50&ns=quay.io>; rel="next""#
        );
        // An `ns` of the upstream's own would pick another registry: replaced, or removed.
        let own = r#"</v2/org/img/tags/list?ns=docker.io&last=x&ns=evil>; rel="next""#;
        assert_eq!(
            rewrite(own, &ns).0,
            r#"</v2/org/img/tags/list?last=x&ns=quay.io>; rel="next""#
        );
        assert_eq!(
            rewrite(own, &view(None, None)).0,
            r#"</v2/org/img/tags/list?last=x>; rel="next""#
        );
        // A name that needs encoding in a query.
        assert_eq!(
            rewrite("</v2/a/tags/list>", &view(None, Some("localhost:5000"))).0,
            "</v2/a/tags/list?ns=localhost%3A5000>"
        );
    }

    #[test]
    fn host_mode_and_default_links_stay_as_sent() {
        let plain = view(None, None);
        for v in [
            NEXT,
            "</v2/org/img/tags/list?last=x&&n=50>;rel=next",
            "</v2/org/img/tags/list?>",
            "<>; rel=self",
            "",
        ] {
            assert_eq!(rewrite(v, &plain), (v.to_string(), 0, 0), "{v}");
        }
    }

    #[test]
    fn absolute_links_to_the_upstream_come_to_the_mirror_others_go() {
        let prefixed = view(Some("quay.io"), None);
        for upstream in [
            "https://quay.io/v2/org/img/tags/list?last=x&n=50",
            "HTTPS://Quay.IO:443/v2/org/img/tags/list?last=x&n=50",
            "http://quay.io/v2/org/img/tags/list?last=x&n=50",
        ] {
            assert_eq!(
                rewrite(&format!("<{upstream}>; rel=\"next\""), &prefixed),
                (
                    r#"<https://m/v2/quay.io/org/img/tags/list?last=x&n=50>; rel="next""#.into(),
                    1,
                    0
                ),
                "{upstream}"
            );
        }
        for other in [
            "https://evil.example/v2/org/img/tags/list?last=x",
            "https://quay.io.evil.example/v2/x/tags/list",
            "https://quay.io:8443/v2/x/tags/list",
            "https://u@quay.io/v2/x/tags/list",
            "https://quay.io/other?last=x",
            "ftp://quay.io/v2/x/tags/list",
            "javascript:alert(1)",
            "//evil.example/v2/x/tags/list",
            "//quay.io/v2/x/tags/list",
        ] {
            let (value, rewritten, dropped) =
                rewrite(&format!("<{other}>; rel=\"next\""), &prefixed);
            assert_eq!((value.as_str(), rewritten, dropped), ("", 0, 1), "{other}");
        }
    }

    #[test]
    fn several_links_and_params() {
        let prefixed = view(Some("quay.io"), None);
        let v = r#"</v2/org/img/tags/list?last=x&n=50>; rel="next"; title="a, b; <c>", <https://evil.example/x>; rel="prev" ,</v2/org/img/tags/list>;rel=first"#;
        assert_eq!(
            rewrite(v, &prefixed),
            (
                r#"</v2/quay.io/org/img/tags/list?last=x&n=50>; rel="next"; title="a, b; <c>", </v2/quay.io/org/img/tags/list>;rel=first"#
                    .into(),
                2,
                1
            )
        );
        // Escaped quotes inside a quoted-string do not end it.
        let v = r#"</v2/a/tags/list>; title="x\", </evil>", </v2/b/tags/list>"#;
        assert_eq!(
            rewrite(v, &prefixed).0,
            r#"</v2/quay.io/a/tags/list>; title="x\", </evil>", </v2/quay.io/b/tags/list>"#
        );
    }

    #[test]
    fn relative_references_resolve_against_the_upstream_request() {
        let ns = view(None, Some("quay.io"));
        assert_eq!(
            rewrite("<?last=x>; rel=next", &ns).0,
            "</v2/org/img/tags/list?last=x&ns=quay.io>; rel=next"
        );
        assert_eq!(
            rewrite("<list?last=x>; rel=next", &ns).0,
            "</v2/org/img/tags/list?last=x&ns=quay.io>; rel=next"
        );
        // Dot segments, or a path that is no `/v2/` path: dropped.
        for t in [
            "../../../x",
            "/v2/org/../../x/tags/list",
            "/v2/a//b/tags/list",
            "/v2/a/%2e%2e/tags/list",
            "/token?scope=x",
            "/_mirror/auth/evil.example/t",
            "/v2",
        ] {
            assert_eq!(
                rewrite(&format!("<{t}>"), &ns),
                (String::new(), 0, 1),
                "{t}"
            );
        }
    }

    #[test]
    fn garbage_is_dropped_whole() {
        let prefixed = view(Some("quay.io"), None);
        let many = vec!["</v2/a/tags/list>"; MAX_LINKS + 1].join(", ");
        let long = format!("</v2/a/tags/list?last={}>", "x".repeat(MAX_HEADER_LEN));
        for g in [
            "</v2/org/img/tags/list?last=x; rel=next",
            "/v2/org/img/tags/list; rel=next",
            "</v2/a/tags/list> rel=next",
            r#"</v2/a/tags/list>; title="unterminated"#,
            "</v2/a/tags/list>; rel=next\r\nx: y",
            "</v2/é/tags/list>",
            "<<<>>>",
            ";;,,<",
            many.as_str(),
            long.as_str(),
        ] {
            assert_eq!(rewrite(g, &prefixed), (String::new(), 0, 1), "{g:?}");
        }
        // Exactly the bound is read; a target with a space or `#` is dropped alone.
        let bound = vec!["</v2/a/tags/list>"; MAX_LINKS].join(", ");
        assert_eq!(rewrite(&bound, &prefixed).1, MAX_LINKS);
        assert_eq!(
            rewrite("</v2/a b>, </v2/a#f>, </v2/c/tags/list>", &prefixed),
            ("</v2/quay.io/c/tags/list>".into(), 1, 2)
        );
    }
}
