//! `Range` header parsing for blob GETs (single byte ranges only).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=N-M` (inclusive)
    FromTo(u64, u64),
    /// `bytes=N-`
    From(u64),
    /// `bytes=-N` (last N bytes)
    Suffix(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed Range header (expected bytes=N-, bytes=N-M or bytes=-N)")]
    Malformed,
    #[error("range not satisfiable")]
    Unsatisfiable,
}

/// A `Range` header's one byte range; `None` for another range unit, which RFC 9110 §14.2 says
/// a server ignores (the whole body is served).
pub fn parse(h: &str) -> Result<Option<RangeSpec>, RangeError> {
    let (unit, spec) = h.trim().split_once('=').ok_or(RangeError::Malformed)?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    let spec = spec.trim();
    if spec.contains(',') {
        return Err(RangeError::Malformed);
    }
    let (a, b) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    let spec = match (a.trim(), b.trim()) {
        ("", n) => RangeSpec::Suffix(num(n)?),
        (s, "") => RangeSpec::From(num(s)?),
        (s, e) => {
            let (s, e) = (num(s)?, num(e)?);
            if e < s {
                return Err(RangeError::Malformed);
            }
            RangeSpec::FromTo(s, e)
        }
    };
    Ok(Some(spec))
}

/// Resolve against the body size: `[start, end)`.
pub fn resolve(spec: RangeSpec, size: u64) -> Result<(u64, u64), RangeError> {
    let (s, e) = match spec {
        RangeSpec::FromTo(s, e) => (s, std::cmp::min(e.saturating_add(1), size)),
        RangeSpec::From(s) => (s, size),
        RangeSpec::Suffix(0) => return Err(RangeError::Unsatisfiable),
        RangeSpec::Suffix(n) => (size.saturating_sub(n), size),
    };
    if s >= size {
        return Err(RangeError::Unsatisfiable);
    }
    Ok((s, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(parse("bytes=10-"), Ok(Some(RangeSpec::From(10))));
        assert_eq!(parse("bytes=0-99"), Ok(Some(RangeSpec::FromTo(0, 99))));
        assert_eq!(parse("Bytes=-5"), Ok(Some(RangeSpec::Suffix(5))));
        assert_eq!(parse("items=0-1"), Ok(None), "another unit is ignored");
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=a-",
            "bytes=5-1",
            "bytes=0-1,3-4",
            "bytes 0-1",
            "bytes=+1-",
            "bytes=99999999999999999999999-",
            "",
        ] {
            assert_eq!(parse(bad), Err(RangeError::Malformed), "{bad}");
        }
    }

    #[test]
    fn resolving() {
        assert_eq!(resolve(RangeSpec::From(10), 100), Ok((10, 100)));
        assert_eq!(resolve(RangeSpec::FromTo(0, 9), 100), Ok((0, 10)));
        assert_eq!(resolve(RangeSpec::FromTo(90, 200), 100), Ok((90, 100)));
        assert_eq!(resolve(RangeSpec::Suffix(10), 100), Ok((90, 100)));
        assert_eq!(resolve(RangeSpec::Suffix(1000), 100), Ok((0, 100)));
        assert_eq!(
            resolve(RangeSpec::From(100), 100),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(
            resolve(RangeSpec::FromTo(u64::MAX, u64::MAX), 100),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(
            resolve(RangeSpec::From(0), 0),
            Err(RangeError::Unsatisfiable)
        );
    }

    mod proptest_range {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

            #[test]
            fn proptest_range_never_panics(h in "\\PC{0,40}", size in any::<u64>()) {
                if let Ok(Some(spec)) = parse(&h) {
                    if let Ok((s, e)) = resolve(spec, size) {
                        prop_assert!(s < e && e <= size);
                    }
                }
            }

            #[test]
            fn proptest_range_round_trip(a in any::<u64>(), b in any::<u64>(), size in 1u64..u64::MAX) {
                let (s, e) = (a.min(b), a.max(b));
                prop_assert_eq!(parse(&format!("bytes={s}-{e}")), Ok(Some(RangeSpec::FromTo(s, e))));
                prop_assert_eq!(parse(&format!("bytes={s}-")), Ok(Some(RangeSpec::From(s))));
                prop_assert_eq!(parse(&format!(" bytes=-{e} ")), Ok(Some(RangeSpec::Suffix(e))));
                match resolve(RangeSpec::FromTo(s, e), size) {
                    Ok((rs, re)) => prop_assert!(rs == s && re == e.saturating_add(1).min(size)),
                    Err(err) => prop_assert!(s >= size && err == RangeError::Unsatisfiable),
                }
                if s != e {
                    prop_assert_eq!(parse(&format!("bytes={e}-{s}")), Err(RangeError::Malformed));
                }
            }
        }
    }
}
