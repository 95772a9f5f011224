//! RFC 7235 `WWW-Authenticate` parsing, serialization and realm rewriting.

use super::config::Registry;
use super::hosts::{any_match, HostPattern};
use super::route::AUTH_PREFIX;
use super::url::{parse_url, parse_url_ref, UrlParts, UrlRef};
use std::fmt;

/// Longest header value accepted.
pub const MAX_HEADER_LEN: usize = 8 * 1024;
/// Most auth-params accepted in one header value.
pub const MAX_PARAMS: usize = 32;
/// Longest learned-realm value accepted from shared data.
pub const MAX_LEARNED_LEN: usize = 2048;

/// One challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Auth scheme as sent (compare case-insensitively).
    pub scheme: String,
    /// token68 form, if used.
    pub token68: Option<String>,
    /// auth-params in order, values unescaped; duplicates kept.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// First parameter named `name` (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Is this a challenge of `scheme` (case-insensitive, as RFC 7235 says)?
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

/// Most `WWW-Authenticate` values [`parse_all`] reads from one response.
pub const MAX_HEADER_VALUES: usize = 16;

/// The challenges of all of a response's `WWW-Authenticate` values (one `&str` per
/// header), in order. A value that does not parse is skipped, so one malformed value does
/// not hide a usable challenge in another; at most [`MAX_HEADER_VALUES`] values are read.
pub fn parse_all<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    values
        .into_iter()
        .take(MAX_HEADER_VALUES)
        .filter_map(|v| parse(v).ok())
        .flatten()
        .collect()
}

/// What a registry client needs of a Bearer challenge to ask its token service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerChallenge {
    /// The token service URL, as sent (not validated: the caller decides which realms it
    /// trusts).
    pub realm: String,
    /// The `service` parameter, if any.
    pub service: Option<String>,
    /// The `scope` parameter, if any.
    pub scope: Option<String>,
}

/// The first Bearer challenge of `challenges` (see [`parse_all`]); `None` when there is none
/// or it names no realm.
pub fn bearer(challenges: &[Challenge]) -> Option<BearerChallenge> {
    let b = challenges.iter().find(|c| c.is("bearer"))?;
    Some(BearerChallenge {
        realm: b.param("realm")?.to_owned(),
        service: b.param("service").map(str::to_owned),
        scope: b.param("scope").map(str::to_owned),
    })
}

/// Why a header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChallengeError {
    /// Longer than [`MAX_HEADER_LEN`].
    TooLong,
    /// More than [`MAX_PARAMS`] params.
    TooManyParams,
    /// Syntax error at byte offset.
    Syntax(usize),
}

impl fmt::Display for ChallengeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChallengeError::TooLong => f.write_str("challenge header too long"),
            ChallengeError::TooManyParams => f.write_str("too many auth-params"),
            ChallengeError::Syntax(at) => write!(f, "challenge syntax error at byte {at}"),
        }
    }
}

// `matches!` on byte ranges compiles to a table lookup; a scan of the punctuation per
// byte was most of a challenge's parse.
fn is_tchar(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~')
}

/// A control character a quoted-string may not hold (a tab it may).
fn is_ctl(c: u8) -> bool {
    c < 0x20 && c != b'\t' || c == 0x7f
}

fn is_token68_char(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
}

/// RFC 7235 token68 (RFC 6750 `b64token`): at least one of `A-Za-z0-9-._~+/`, then any
/// `=` padding. What a Bearer token is made of, so what may follow `Bearer ` in a header.
pub fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty() && body.bytes().all(is_token68_char)
}

/// An auth-param value as it appears in the header: a token, or the inside of a
/// quoted-string with its quoted-pairs still escaped.
#[derive(Debug, Clone, Copy)]
struct RawValue<'a> {
    text: &'a str,
    /// `text` holds quoted-pairs (seen by the parser: nobody scans for them again).
    escaped: bool,
}

impl<'a> RawValue<'a> {
    /// The value (quoted-pairs resolved); borrowed unless it holds one.
    fn unescaped(self) -> std::borrow::Cow<'a, str> {
        if !self.escaped {
            return self.text.into();
        }
        let mut out = String::with_capacity(self.text.len());
        push_unescaped(&mut out, self.text, false);
        out.into()
    }

    /// Appends the value as a quoted-string, exactly as [`push_quoted`] writes
    /// [`RawValue::unescaped`], without building it.
    fn push_quoted_to(self, out: &mut String) {
        out.push('"');
        if self.escaped {
            push_unescaped(out, self.text, true);
        } else {
            // Neither a token nor a quoted-string without quoted-pairs holds `"` or `\`.
            out.push_str(self.text);
        }
        out.push('"');
    }
}

/// Appends the inside of a quoted-string with its quoted-pairs resolved; `keep` keeps
/// the escape of `"` and `\` (what [`push_quoted`] would write back).
fn push_unescaped(out: &mut String, text: &str, keep: bool) {
    let mut rest = text;
    while let Some(i) = rest.bytes().position(|b| b == b'\\') {
        // The byte after an ASCII `\` starts a character (the parser saw it escaped).
        let (Some(head), Some(tail)) = (rest.get(..i), rest.get(i + 1..)) else {
            break;
        };
        out.push_str(head);
        if keep && (tail.starts_with('"') || tail.starts_with('\\')) {
            out.push('\\');
        }
        let Some(c) = tail.chars().next() else {
            break;
        };
        out.push(c);
        rest = tail.get(c.len_utf8()..).unwrap_or_default();
    }
    out.push_str(rest);
}

/// One challenge as it appears in the header; its params are a range of the list
/// [`parse_raw`] returns beside.
#[derive(Debug, Clone)]
struct RawChallenge<'a> {
    scheme: &'a str,
    token68: Option<&'a str>,
    params: std::ops::Range<usize>,
}

/// An auth-param name and value as they appear in the header.
type RawParam<'a> = (&'a str, RawValue<'a>);

struct Parser<'a> {
    src: &'a str,
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn peek_at(&self, j: usize) -> Option<u8> {
        self.s.get(j).copied()
    }
    fn skip_ws_from(&self, mut j: usize) -> usize {
        while matches!(self.peek_at(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        j
    }
    fn skip_ws(&mut self) {
        self.i = self.skip_ws_from(self.i);
    }
    fn token_end(&self, mut j: usize) -> usize {
        while self.peek_at(j).is_some_and(is_tchar) {
            j += 1;
        }
        j
    }
    fn slice(&self, a: usize, b: usize) -> Result<&'a str, ChallengeError> {
        self.src.get(a..b).ok_or(ChallengeError::Syntax(a))
    }
    /// After a token68 candidate at `j`: end or comma (after OWS)?
    fn at_item_end(&self, j: usize) -> bool {
        let k = self.skip_ws_from(j);
        matches!(self.peek_at(k), None | Some(b','))
    }
    /// A quoted-string at the cursor: its inside, quoted-pairs still escaped.
    fn quoted(&mut self) -> Result<RawValue<'a>, ChallengeError> {
        let start = self.i;
        // Plain text runs (most of a realm or scope) are skipped in a tight loop.
        let ordinary = |c: u8| c >= 0x20 && c != b'"' && c != b'\\' && c != 0x7f;
        let mut j = start + 1; // after the opening quote
        let mut escaped = false;
        loop {
            while self.peek_at(j).is_some_and(ordinary) {
                j += 1;
            }
            match self.peek_at(j) {
                None => return Err(ChallengeError::Syntax(start)),
                Some(b'"') => {
                    self.i = j + 1;
                    let text = self.slice(start + 1, j)?;
                    return Ok(RawValue { text, escaped });
                }
                Some(b'\\') => {
                    let c = self.peek_at(j + 1).ok_or(ChallengeError::Syntax(j))?;
                    if is_ctl(c) {
                        return Err(ChallengeError::Syntax(j));
                    }
                    escaped = true;
                    j += 2;
                }
                // A tab, or a control character.
                Some(c) => {
                    if is_ctl(c) {
                        return Err(ChallengeError::Syntax(j));
                    }
                    j += 1;
                }
            }
        }
    }
}

/// Parses a header value as a list of challenges.
pub fn parse(value: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let (challenges, params) = parse_raw(value)?;
    Ok(challenges
        .into_iter()
        .map(|c| Challenge {
            scheme: c.scheme.to_string(),
            token68: c.token68.map(str::to_string),
            params: params
                .get(c.params)
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| (k.to_string(), v.unescaped().into_owned()))
                .collect(),
        })
        .collect())
}

/// [`parse`] without copying: slices of `value`.
fn parse_raw(value: &str) -> Result<(Vec<RawChallenge<'_>>, Vec<RawParam<'_>>), ChallengeError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(ChallengeError::TooLong);
    }
    let mut p = Parser {
        src: value,
        s: value.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    let mut params = Vec::new();
    loop {
        // Skip empty list elements.
        while matches!(p.peek(), Some(b' ' | b'\t' | b',')) {
            p.i += 1;
        }
        if p.peek().is_none() {
            break;
        }
        let s0 = p.i;
        let s1 = p.token_end(s0);
        if s1 == s0 {
            return Err(ChallengeError::Syntax(s0));
        }
        let mut ch = RawChallenge {
            scheme: p.slice(s0, s1)?,
            token68: None,
            params: params.len()..params.len(),
        };
        p.i = s1;
        if p.at_item_end(p.i) {
            p.i = p.skip_ws_from(p.i);
            out.push(ch);
            continue;
        }
        // Need at least one space between scheme and the rest.
        if !matches!(p.peek(), Some(b' ' | b'\t')) {
            return Err(ChallengeError::Syntax(p.i));
        }
        p.skip_ws();
        // token68?
        let t0 = p.i;
        let mut t1 = t0;
        while p.peek_at(t1).is_some_and(is_token68_char) {
            t1 += 1;
        }
        if t1 > t0 {
            let mut t2 = t1;
            while p.peek_at(t2) == Some(b'=') {
                t2 += 1;
            }
            if p.at_item_end(t2) {
                ch.token68 = Some(p.slice(t0, t2)?);
                p.i = p.skip_ws_from(t2);
                out.push(ch);
                continue;
            }
        }
        // auth-params.
        loop {
            let n0 = p.i;
            let n1 = p.token_end(n0);
            if n1 == n0 {
                return Err(ChallengeError::Syntax(n0));
            }
            let name = p.slice(n0, n1)?;
            p.i = p.skip_ws_from(n1);
            if p.peek() != Some(b'=') {
                return Err(ChallengeError::Syntax(p.i));
            }
            p.i += 1;
            p.skip_ws();
            let val = if p.peek() == Some(b'"') {
                p.quoted()?
            } else {
                let v0 = p.i;
                let v1 = p.token_end(v0);
                if v1 == v0 {
                    return Err(ChallengeError::Syntax(v0));
                }
                p.i = v1;
                RawValue {
                    text: p.slice(v0, v1)?,
                    escaped: false,
                }
            };
            if params.len() >= MAX_PARAMS {
                return Err(ChallengeError::TooManyParams);
            }
            params.push((name, val));
            ch.params.end = params.len();
            p.skip_ws();
            match p.peek() {
                None => break,
                Some(b',') => {
                    // Next param or next challenge?
                    let mut j = p.i;
                    while matches!(p.peek_at(j), Some(b' ' | b'\t' | b',')) {
                        j += 1;
                    }
                    if p.peek_at(j).is_none() {
                        p.i = j;
                        break;
                    }
                    let k = p.token_end(j);
                    let after = p.skip_ws_from(k);
                    p.i = j;
                    if k == j || p.peek_at(after) != Some(b'=') {
                        break; // a new challenge begins at j
                    }
                }
                Some(_) => return Err(ChallengeError::Syntax(p.i)),
            }
        }
        out.push(ch);
    }
    Ok((out, params))
}

/// Appends `v` to `s` as a quoted-string.
fn push_quoted(s: &mut String, v: &str) {
    s.reserve(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
}

/// Serializes challenges. Values are written as quoted-strings (always valid,
/// and what registries send), separated by `,`; challenges by `, `.
pub fn serialize(challenges: &[Challenge]) -> String {
    let mut out = String::with_capacity(256);
    for (i, c) in challenges.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&c.scheme);
        if let Some(t) = &c.token68 {
            out.push(' ');
            out.push_str(t);
        } else if !c.params.is_empty() {
            out.push(' ');
            for (j, (k, v)) in c.params.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(k);
                out.push('=');
                push_quoted(&mut out, v);
            }
        }
    }
    out
}

/// The realm and service of a registry's Bearer challenge, as the filter learns and stores
/// them (from its `/v2/` answer) to route token requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedRealm {
    /// The realm URL as the upstream sent it.
    pub realm: String,
    /// The `service` parameter (may be empty).
    pub service: String,
}

impl LearnedRealm {
    /// Shared-data value: `<realm URL>\n<service>`.
    pub fn encode(&self) -> String {
        format!("{}\n{}", self.realm, self.service)
    }

    /// Parses a shared-data value; `None` when malformed (the caller learns it again).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_LEARNED_LEN {
            return None;
        }
        let s = std::str::from_utf8(bytes).ok()?;
        let (realm, service) = s.split_once('\n')?;
        let l = LearnedRealm {
            realm: realm.to_string(),
            service: service.to_string(),
        };
        l.is_valid().then_some(l)
    }

    /// The realm URL parsed; `None` when it is not an absolute http(s) URL.
    pub fn url(&self) -> Option<UrlParts> {
        parse_url(&self.realm)
    }

    fn is_valid(&self) -> bool {
        Self::fits(&self.realm, &self.service) && self.url().is_some()
    }

    /// Everything [`LearnedRealm::is_valid`] checks but the URL.
    fn fits(realm: &str, service: &str) -> bool {
        realm.len() + service.len() < MAX_LEARNED_LEN
            && service.bytes().all(|b| (0x21..=0x7e).contains(&b))
    }

    /// Is the realm's host on `registry`'s `realm_hosts`?
    pub fn allowed_for(&self, registry: &Registry) -> bool {
        self.url()
            .is_some_and(|u| any_match(&registry.realm_hosts, &u.authority))
    }

    /// Builds a learned realm from a challenge's `realm` and `service`, if valid.
    pub fn new(realm: &str, service: Option<&str>) -> Option<Self> {
        let l = LearnedRealm {
            realm: realm.to_string(),
            service: service.unwrap_or_default().to_string(),
        };
        l.is_valid().then_some(l)
    }

    /// [`LearnedRealm::new`] for a `realm` the caller already parsed with [`parse_url`].
    pub(crate) fn from_url(realm: &str, service: Option<&str>) -> Option<Self> {
        let service = service.unwrap_or_default();
        Self::fits(realm, service).then(|| LearnedRealm {
            realm: realm.to_string(),
            service: service.to_string(),
        })
    }
}

/// A set of auth-param indexes of one header (at most [`MAX_PARAMS`]), without allocating.
#[derive(Debug, Default, Clone, Copy)]
struct ParamSet(u64);

const _: () = assert!(MAX_PARAMS <= 64);

impl ParamSet {
    fn bit(i: usize) -> u64 {
        u32::try_from(i)
            .ok()
            .and_then(|s| 1u64.checked_shl(s))
            .unwrap_or(0)
    }
    fn insert(&mut self, i: usize) {
        self.0 |= Self::bit(i);
    }
    fn contains(self, i: usize) -> bool {
        self.0 & Self::bit(i) != 0
    }
}

/// What [`rewrite_challenges`] does with a challenge it does not rewrite to the mirror (not
/// Bearer, a realm off the allowlist or none) and with a value that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrewritten {
    /// Passed on as the upstream sent it.
    Keep,
    /// Removed: the client would answer it with the credential it keeps for the mirror
    /// host, which must not reach this registry (see
    /// [`super::route::Forward::withhold_client_credential`]).
    Drop,
}

/// Result of [`rewrite_realms`] / [`rewrite_challenges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The new header value: the original when nothing was rewritten or dropped, empty
    /// when every challenge was dropped.
    pub value: String,
    /// Bearer realms rewritten to the mirror.
    pub rewritten: usize,
    /// Bearer realms left alone (not allowlisted, not a URL) or unparseable headers.
    pub rejected: usize,
    /// Challenges removed by [`Unrewritten::Drop`] (an unparseable value counts as one).
    pub dropped: usize,
    /// The upstream realm and service of every rewritten challenge, in order.
    pub realms: Vec<LearnedRealm>,
}

/// Rewrites allowlisted Bearer realms to `<mirror_base>/_mirror/auth/<host><path>[?query]`.
pub fn rewrite_realms(header: &str, allowlist: &[HostPattern], mirror_base: &str) -> Rewritten {
    rewrite_challenges(header, allowlist, mirror_base, None, Unrewritten::Keep)
}

/// Puts `prefix/` in front of the name of every `repository:<name>:<actions>` in a
/// (space-separated) scope value; other scopes unchanged.
pub fn prefix_scope(value: &str, prefix: &str) -> String {
    value
        .split(' ')
        .map(|s| match s.strip_prefix("repository:") {
            Some(rest) if rest.contains(':') && !rest.starts_with(':') => {
                format!("repository:{prefix}/{rest}")
            }
            _ => s.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Appends `v` with `"` and `\` escaped (the inside of a quoted-string).
fn push_escaped(s: &mut String, v: &str) {
    if !v.bytes().any(|b| b == b'"' || b == b'\\') {
        s.push_str(v);
        return;
    }
    let mut rest = v;
    while let Some(i) = rest.find(['"', '\\']) {
        let (Some(head), Some(tail)) = (rest.get(..i), rest.get(i..)) else {
            break;
        };
        s.push_str(head);
        s.push('\\');
        let Some(c) = tail.chars().next() else {
            break;
        };
        s.push(c);
        rest = tail.get(1..).unwrap_or_default();
    }
    s.push_str(rest);
}

/// [`rewrite_realms`], and for requests routed by path prefix (`scope_prefix` = the
/// client's registry component) the `scope` of each rewritten challenge is put into the
/// client's namespace: `repository:<prefix>/<upstream name>:<actions>`. With
/// [`Unrewritten::Drop`] only the challenges whose every realm (at least one) is rewritten
/// are kept.
///
/// The result is [`serialize`] of the rewritten [`parse`], written in one pass from
/// slices of `header` (this runs on every 401 a registry sends).
pub fn rewrite_challenges(
    header: &str,
    allowlist: &[HostPattern],
    mirror_base: &str,
    scope_prefix: Option<&str>,
    unrewritten: Unrewritten,
) -> Rewritten {
    let drop = unrewritten == Unrewritten::Drop;
    // Nothing rewritten: `dropped` challenges were there.
    let unchanged = |rejected, dropped| Rewritten {
        value: if drop {
            String::new()
        } else {
            header.to_string()
        },
        rewritten: 0,
        rejected,
        dropped: if drop { dropped } else { 0 },
        realms: Vec::new(),
    };
    let Ok((challenges, params)) = parse_raw(header) else {
        return unchanged(1, 1);
    };
    let mut rewritten = 0;
    let mut rejected = 0;
    let mut realms = Vec::new();
    // The params (by index) whose realm is rewritten.
    let mut new_realms = ParamSet::default();
    // The first of them when it borrows the header (no quoted-pairs): the usual single
    // realm is parsed once; any other is parsed again below.
    let mut first_url: Option<(usize, UrlRef<'_>)> = None;
    for ch in &challenges {
        if !ch.scheme.eq_ignore_ascii_case("bearer") {
            continue;
        }
        let ps = params.get(ch.params.clone()).unwrap_or_default();
        let mut service = None;
        for (pi, (k, v)) in ps.iter().enumerate() {
            if !k.eq_ignore_ascii_case("realm") {
                continue;
            }
            let realm = v.unescaped();
            let allowed = |u: &UrlRef<'_>| any_match(allowlist, &u.authority);
            let (ok, url) = if v.escaped {
                (parse_url_ref(&realm).is_some_and(|u| allowed(&u)), None)
            } else {
                let u = parse_url_ref(v.text).filter(allowed);
                (u.is_some(), u)
            };
            if !ok {
                rejected += 1;
                continue;
            }
            let service = service.get_or_insert_with(|| {
                ps.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("service"))
                    .map(|(_, v)| v.unescaped())
            });
            realms.extend(LearnedRealm::from_url(&realm, service.as_deref()));
            let at = ch.params.start + pi;
            new_realms.insert(at);
            if first_url.is_none() {
                first_url = url.map(|u| (at, u));
            }
            rewritten += 1;
        }
    }
    if rewritten == 0 {
        return unchanged(rejected, challenges.len());
    }
    let is_realm = |pi: &usize| {
        params
            .get(*pi)
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case("realm"))
    };
    let mut dropped = 0;
    let mut out = String::with_capacity(
        header.len() + rewritten * (mirror_base.len() + AUTH_PREFIX.len() + 2),
    );
    for c in &challenges {
        if drop {
            let mut realms = c.params.clone().filter(is_realm).peekable();
            if realms.peek().is_none() || !realms.all(|pi| new_realms.contains(pi)) {
                dropped += 1;
                continue;
            }
        }
        // A scheme is never empty: `out` is empty only before the first challenge.
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(c.scheme);
        if let Some(t) = c.token68 {
            out.push(' ');
            out.push_str(t);
            continue;
        }
        // The scopes of a challenge whose realm is rewritten go to the client's namespace.
        let prefix = scope_prefix.filter(|_| c.params.clone().any(|pi| new_realms.contains(pi)));
        for pi in c.params.clone() {
            let Some((k, v)) = params.get(pi) else {
                continue;
            };
            out.push(if pi == c.params.start { ' ' } else { ',' });
            out.push_str(k);
            out.push('=');
            let realm = new_realms.contains(pi).then(|| v.unescaped());
            let url = match &first_url {
                Some((at, u)) if *at == pi => Some(u.clone()),
                // Parsed again rather than kept: cheaper than a list of parts per 401.
                _ => realm.as_deref().and_then(parse_url_ref),
            };
            if let Some(u) = url {
                out.push('"');
                push_escaped(&mut out, mirror_base);
                out.push_str(AUTH_PREFIX);
                push_escaped(&mut out, &u.authority);
                push_escaped(&mut out, u.path);
                if let Some(q) = u.query {
                    out.push('?');
                    push_escaped(&mut out, q);
                }
                out.push('"');
            } else if let (Some(prefix), true) = (prefix, k.eq_ignore_ascii_case("scope")) {
                push_quoted(&mut out, &prefix_scope(&v.unescaped(), prefix));
            } else {
                v.push_quoted_to(&mut out);
            }
        }
    }
    Rewritten {
        value: out,
        rewritten,
        rejected,
        dropped,
        realms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn parses_docker_hub() {
        let c = parse(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "Bearer");
        assert_eq!(c[0].param("REALM"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].params.len(), 3);
    }

    #[test]
    fn parses_lists_and_forms() {
        let c = parse(
            r#"Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io""#,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].params, vec![p("realm", "quay.io")]);
        assert_eq!(c[1].params.len(), 2);
        let c = parse("Negotiate abc+/=, bearer realm = tok , x=\"a\\\"b\\\\c\"").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].token68.as_deref(), Some("abc+/="));
        assert_eq!(c[1].params, vec![p("realm", "tok"), p("x", "a\"b\\c")]);
        let c = parse("Basic, Bearer").unwrap();
        assert_eq!(c.len(), 2);
        assert!(c[1].params.is_empty());
        let c = parse("  ,Bearer  realm=\"r\",  scope=\"a\", scope=\"b\" ,, ").unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].params,
            vec![p("realm", "r"), p("scope", "a"), p("scope", "b")]
        );
        let c = parse("Newauth realm=\"apps\", type=1, title=\"Login to \\\"apps\\\"\", Basic realm=\"simple\"").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].params.len(), 3);
        assert_eq!(c[0].param("title"), Some("Login to \"apps\""));
        assert_eq!(parse("").unwrap(), vec![]);
        // `realm=` alone is a valid token68.
        assert_eq!(
            parse("Bearer realm=").unwrap()[0].token68.as_deref(),
            Some("realm=")
        );
    }

    #[test]
    fn token68_is_one_run_then_padding() {
        for ok in ["t", "eyJ.eyJ-_.sig~+/", "abc==", "realm="] {
            assert!(is_token68(ok), "{ok}");
            // The parser reads the same set as a challenge's token68.
            let c = parse(&format!("X {ok}")).unwrap();
            assert_eq!(c[0].token68.as_deref(), Some(ok));
        }
        for bad in [
            "",
            "=",
            "===",
            "=x",
            "a=b",
            "a b",
            "t,",
            "caf\u{e9}",
            "a\r\n",
        ] {
            assert!(!is_token68(bad), "{bad:?}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "Bearer realm=\"unterminated",
            "Bearer realm=\"a\" junk",
            "=x",
            "Bearer\"x\"",
            "Bearer realm=\"a\x01\"",
            "Bearer a b",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("Bearer realm=\"{}\"", "a".repeat(MAX_HEADER_LEN));
        assert_eq!(parse(&long), Err(ChallengeError::TooLong));
        let many: Vec<String> = (0..33).map(|i| format!("p{i}=v")).collect();
        let many = format!("Bearer {}", many.join(","));
        assert_eq!(parse(&many), Err(ChallengeError::TooManyParams));
        let ok: Vec<String> = (0..32).map(|i| format!("p{i}=v")).collect();
        assert!(parse(&format!("Bearer {}", ok.join(","))).is_ok());
    }

    #[test]
    fn serializes_roundtrip() {
        let s = r#"Basic realm="quay.io", Bearer realm="https://x/y",service="a\"b""#;
        let c = parse(s).unwrap();
        assert_eq!(serialize(&c), s);
        assert_eq!(parse(&serialize(&c)).unwrap(), c);
        let c = parse("Negotiate abc==").unwrap();
        assert_eq!(serialize(&c), "Negotiate abc==");
    }

    #[test]
    fn rewrites_realms() {
        let allow = vec![
            HostPattern::parse("auth.docker.io").unwrap(),
            HostPattern::parse("*.pkg.dev").unwrap(),
        ];
        let r = rewrite_realms(
            r#"Bearer realm="https://Auth.Docker.io:443/token?x=1",service="registry.docker.io",scope="a",scope="b""#,
            &allow,
            "http://127.0.0.1:5000",
        );
        assert_eq!(r.rewritten, 1);
        assert_eq!(r.rejected, 0);
        assert_eq!(
            r.value,
            r#"Bearer realm="http://127.0.0.1:5000/_mirror/auth/auth.docker.io/token?x=1",service="registry.docker.io",scope="a",scope="b""#
        );
        let r = rewrite_realms(
            r#"Basic realm="quay.io", Bearer realm="https://evil.example/token""#,
            &allow,
            "https://m",
        );
        assert_eq!((r.rewritten, r.rejected), (0, 1));
        assert_eq!(
            r.value,
            r#"Basic realm="quay.io", Bearer realm="https://evil.example/token""#
        );
        let r = rewrite_realms(
            r#"Bearer realm="https://us-docker.pkg.dev/v2/token""#,
            &allow,
            "https://m",
        );
        assert_eq!(
            r.value,
            r#"Bearer realm="https://m/_mirror/auth/us-docker.pkg.dev/v2/token""#
        );
        // Userinfo, other ports and non-URL realms are not rewritten.
        for realm in [
            "https://u@auth.docker.io/t",
            "https://auth.docker.io:8443/t",
            "auth.docker.io",
            "ftp://auth.docker.io/",
        ] {
            let r = rewrite_realms(&format!("Bearer realm=\"{realm}\""), &allow, "https://m");
            assert_eq!((r.rewritten, r.rejected), (0, 1), "{realm}");
        }
        let r = rewrite_realms("Bearer realm=\"oops", &allow, "https://m");
        assert_eq!((r.rewritten, r.rejected), (0, 1));
        assert_eq!(r.value, "Bearer realm=\"oops");
    }

    #[test]
    fn rewrites_scopes_for_path_prefixes() {
        let allow = vec![HostPattern::parse("quay.io").unwrap()];
        let h = r#"Bearer realm="https://quay.io/v2/auth",service="quay.io",scope="repository:coreos/etcd:pull""#;
        let r = rewrite_challenges(h, &allow, "http://m", Some("quay.io"), Unrewritten::Keep);
        assert_eq!(
            r.value,
            r#"Bearer realm="http://m/_mirror/auth/quay.io/v2/auth",service="quay.io",scope="repository:quay.io/coreos/etcd:pull""#
        );
        assert_eq!(
            r.realms.first().cloned(),
            LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io"))
        );
        // Without a prefix (host mode, ns, default) the scope is the upstream's.
        let r = rewrite_challenges(h, &allow, "http://m", None, Unrewritten::Keep);
        assert!(r.value.contains(r#"scope="repository:coreos/etcd:pull""#));
        // A challenge whose realm is not rewritten keeps its scope.
        let h2 = r#"Bearer realm="https://evil.example/t",scope="repository:a:pull""#;
        let r = rewrite_challenges(h2, &allow, "http://m", Some("quay.io"), Unrewritten::Keep);
        assert_eq!(r.value.as_str(), h2);
        assert!(r.realms.is_empty());
        assert_eq!(
            prefix_scope(
                "repository:a/b:pull,push registry:catalog:* repository:x repository::pull",
                "docker.io"
            ),
            "repository:docker.io/a/b:pull,push registry:catalog:* repository:x repository::pull"
        );
    }

    #[test]
    fn drops_every_challenge_not_rewritten_to_the_mirror_when_asked() {
        let allow = vec![HostPattern::parse("quay.io").unwrap()];
        let drop = |h: &str| rewrite_challenges(h, &allow, "https://m", None, Unrewritten::Drop);
        let bearer = r#"Bearer realm="https://m/_mirror/auth/quay.io/v2/auth",service="quay.io""#;
        let r = drop(
            r#"Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io""#,
        );
        assert_eq!((r.value.as_str(), r.rewritten, r.dropped), (bearer, 1, 1));
        assert_eq!(r.realms.len(), 1);
        // After the Bearer one, a token68 scheme, a foreign realm, a Bearer whose second
        // realm is foreign: all dropped.
        let r = drop(
            r#"Bearer realm="https://quay.io/v2/auth",service="quay.io", Negotiate abc=, Bearer realm="https://evil.example/t", Bearer realm="https://quay.io/a",realm="https://evil.example/b""#,
        );
        assert_eq!(
            (r.value.as_str(), r.rewritten, r.rejected, r.dropped),
            (bearer, 2, 2, 3)
        );
        // Nothing rewritten, or a value that does not parse: no challenge left.
        for (h, dropped) in [
            (r#"Basic realm="quay.io""#, 1),
            (r#"Bearer realm="https://evil.example/t", Basic"#, 2),
            (r#"Basic realm="unterminated"#, 1),
            ("", 0),
        ] {
            let r = drop(h);
            assert_eq!(
                (r.value.as_str(), r.rewritten, r.dropped),
                ("", 0, dropped),
                "{h}"
            );
        }
        // Keep: the same values as before.
        let h = r#"Bearer realm="https://evil.example/t", Basic"#;
        let r = rewrite_challenges(h, &allow, "https://m", None, Unrewritten::Keep);
        assert_eq!((r.value.as_str(), r.dropped), (h, 0));
    }

    #[test]
    fn learned_realm_values() {
        let l = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        assert_eq!(l.encode(), "https://quay.io/v2/auth\nquay.io");
        assert_eq!(LearnedRealm::decode(l.encode().as_bytes()), Some(l.clone()));
        let n = LearnedRealm::new("https://r.example/t?x=1", None).unwrap();
        assert_eq!(LearnedRealm::decode(n.encode().as_bytes()), Some(n.clone()));
        for bad in [
            &b""[..],
            b"https://quay.io/v2/auth",
            b"not a url\nquay.io",
            b"ftp://quay.io/\nq",
            b"https://quay.io/\nq q",
            b"https://quay.io/\nq\nr",
            b"https://u@quay.io/\nq",
            b"\xff\nq",
        ] {
            assert_eq!(LearnedRealm::decode(bad), None, "{bad:?}");
        }
        let long = format!("https://quay.io/{}\nq", "a".repeat(MAX_LEARNED_LEN));
        assert_eq!(LearnedRealm::decode(long.as_bytes()), None);
        let c = crate::config::parse(b"").unwrap();
        assert!(l.allowed_for(c.registry("quay.io").unwrap()));
        assert!(!l.allowed_for(c.registry("docker.io").unwrap()));
    }

    // The cases the cache's own parser was tested with (cache-service/src/upstream/auth.rs),
    // through the API the cache uses: `parse_all` + `bearer` + `Challenge::is`.
    #[test]
    fn registry_client_view() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            bearer(&parse_all([hub])),
            Some(BearerChallenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        let quay =
            r#"Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io""#;
        let c = parse_all([quay]);
        assert_eq!(c.len(), 2);
        assert!(c[0].is("basic") && c[0].param("realm") == Some("quay.io"));
        let b = bearer(&c).unwrap();
        assert_eq!(
            (b.realm.as_str(), b.service.as_deref(), b.scope),
            ("https://quay.io/v2/auth", Some("quay.io"), None)
        );
        // Whitespace around `=`, escapes and commas inside quotes, a bare scheme after.
        let c = parse_all([r#"Bearer realm = "a\"b, c" , service=tok , Basic"#]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a\"b, c"));
        assert_eq!(c[0].param("service"), Some("tok"));
        assert!(c[1].is("Basic"));
        // Scheme and parameter names in any case.
        let b = bearer(&parse_all([r#"BEARER REALM="x""#])).unwrap();
        assert_eq!((b.realm.as_str(), b.service), ("x", None));
        assert!(parse_all([""]).is_empty());
        assert!(parse_all(["\"\"\"=,,,=\u{e9}"]).is_empty());
        // Several header values: a malformed one is skipped, the next one still counts.
        let c = parse_all(["Basic realm=\"unterminated", "Basic realm=\"r\"", hub]);
        assert_eq!(c.len(), 2);
        assert_eq!(
            bearer(&c).map(|b| b.realm),
            Some("https://auth.docker.io/token".into())
        );
        // The first Bearer challenge decides; without a realm there is nothing to ask.
        assert_eq!(bearer(&parse_all(["Bearer service=x", hub])), None);
        assert_eq!(bearer(&parse_all(["Basic realm=\"r\""])), None);
        // At most MAX_HEADER_VALUES values are read.
        let many = vec!["Basic realm=\"r\""; MAX_HEADER_VALUES + 5];
        assert_eq!(parse_all(many).len(), MAX_HEADER_VALUES);
    }
}
