//! One spelling per path before routes see it: a route that admits
//! `/public` and one that guards `/admin` must not be told apart by how a
//! client spells `/admin` (`/public/../admin`, `/public/%2e%2e/admin`,
//! `//admin`). The rules are Envoy's and Istio's safe defaults:
//!
//! 1. percent-encoded unreserved characters (letters, digits, `-`, `.`,
//!    `_`, `~`) are decoded, other encodings keep their bytes with
//!    upper-case hex (RFC 3986 6.2.2.1-2);
//! 2. encodings that are ambiguous for matching are refused: `%2F` (a `/`
//!    that is not a segment boundary to the proxy but may be to the
//!    application), `%5C` (`\`, a separator to some servers) and `%00`;
//!    so is a `%` not followed by two hex digits, a literal `\` (the same
//!    separator, unencoded) and a dot segment with path parameters (`..;`,
//!    `.;x`: servlet containers drop the parameters and climb, a router
//!    sees an ordinary segment);
//! 3. runs of `/` become one;
//! 4. `.` and `..` segments are removed (RFC 3986 5.2.4); `..` never climbs
//!    above the root.
//!
//! The normalised path is what routes match and what the application
//! receives. A path that does not start with `/` (`*` of `OPTIONS *`) is
//! left alone.

use std::borrow::Cow;

/// Why a path is refused (answered 400, never routed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathRejection {
    #[error("the path has an encoded `/` (%2F): ambiguous for route matching")]
    EncodedSlash,
    #[error("the path has an encoded `\\` (%5C): ambiguous for route matching")]
    EncodedBackslash,
    #[error("the path has an encoded NUL (%00)")]
    EncodedNul,
    #[error("the path has a `%` that is not followed by two hex digits")]
    BadEscape,
    #[error("the path has a `\\`: a separator to some servers, ambiguous for route matching")]
    Backslash,
    #[error("the path has a dot segment with parameters (`..;`): ambiguous for route matching")]
    DotSegmentParameters,
}

/// The normalised spelling of `path` (borrowed when it already is).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathRejection> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    if path.contains('\\') {
        return Err(PathRejection::Backslash);
    }
    if already_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let normal = normalize_in_full(path)?;
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
}

/// Every step, for a path starting with `/` and without a backslash.
fn normalize_in_full(path: &str) -> Result<String, PathRejection> {
    let decoded = decode_unreserved(path)?;
    if decoded.split('/').any(dot_segment_with_parameters) {
        return Err(PathRejection::DotSegmentParameters);
    }
    Ok(remove_dot_segments(&merge_slashes(&decoded)))
}

/// A path the steps below would give back unchanged, told without
/// allocating (most requests' paths): no escape to decode, no empty
/// segment to merge, no segment starting with `.` (so none is `.` or `..`,
/// with or without parameters). Conservative: `/.well-known` takes the
/// full way, and comes out the same.
fn already_normal(path: &str) -> bool {
    path.starts_with('/') && !path.contains('%') && !path.contains("//") && !path.contains("/.")
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode_unreserved(path: &str) -> Result<String, PathRejection> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy up to the next escape in one piece (keeps UTF-8 whole).
            let next = path[i..].find('%').map_or(bytes.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathRejection::BadEscape);
        };
        let b = hi << 4 | lo;
        match b {
            b'/' => return Err(PathRejection::EncodedSlash),
            b'\\' => return Err(PathRejection::EncodedBackslash),
            0 => return Err(PathRejection::EncodedNul),
            b if unreserved(b) => out.push(b as char),
            b => {
                out.push('%');
                out.push_str(&format!("{b:02X}"));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// `..;x` or `.;` (also with `;` encoded): `.` or `..` to an application
/// that drops path parameters, an ordinary segment to a router.
fn dot_segment_with_parameters(segment: &str) -> bool {
    let head = segment.split(';').next().unwrap_or_default();
    let head = head.split("%3B").next().unwrap_or_default();
    (head == "." || head == "..") && head.len() < segment.len()
}

fn merge_slashes(path: &str) -> Cow<'_, str> {
    if !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut previous_slash = false;
    for c in path.chars() {
        if c == '/' && previous_slash {
            continue;
        }
        previous_slash = c == '/';
        out.push(c);
    }
    Cow::Owned(out)
}

/// RFC 3986 5.2.4 for an absolute path without empty segments: a stack of
/// segments; `.` is dropped, `..` pops (never past the root). A path that
/// ended in `.` or `..` keeps its trailing `/` (`/a/b/..` is `/a/`).
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => trailing_slash = last,
            ".." => {
                kept.pop();
                trailing_slash = last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortcut_gives_what_the_long_way_gives() {
        let pieces = [
            "a", ".", "..", "", ".x", "a;b", "..;x", ".;", "%2e", "%2E%2e", "%41", "b.c", "~u",
            "%2e;x", "a%3Bb", "x.",
        ];
        let mut paths = vec!["/".to_string()];
        for depth in 1..=3 {
            let mut built = vec![String::new()];
            for _ in 0..depth {
                built = built
                    .iter()
                    .flat_map(|p| pieces.iter().map(move |s| format!("{p}/{s}")))
                    .collect();
            }
            paths.extend(built.iter().cloned());
            paths.extend(built.iter().map(|p| format!("{p}/")));
        }
        let mut shortcuts = 0;
        for path in &paths {
            let long = normalize_in_full(path);
            assert_eq!(n(path), long, "{path}");
            if already_normal(path) {
                shortcuts += 1;
                assert_eq!(long.as_deref(), Ok(path.as_str()), "{path}");
                assert!(matches!(normalize_path(path), Ok(Cow::Borrowed(_))));
            }
        }
        // The shortcut is taken (an ordinary path allocates nothing).
        assert!(shortcuts > 100, "{shortcuts} of {}", paths.len());
        assert!(matches!(
            normalize_path("/helloworld.Greeter/SayHello"),
            Ok(Cow::Borrowed(_))
        ));
    }

    fn n(p: &str) -> Result<String, PathRejection> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn every_spelling_of_a_climb_out_of_public_is_admin() {
        for spelling in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/public/.%2e/admin",
            "/public/./../admin",
            "//admin",
            "/public//..//admin",
            "/%61dmin",
            "/../../admin",
        ] {
            assert_eq!(n(spelling).as_deref(), Ok("/admin"), "{spelling}");
        }
    }

    #[test]
    fn ambiguous_encodings_are_refused() {
        assert_eq!(n("/public/..%2fadmin"), Err(PathRejection::EncodedSlash));
        assert_eq!(
            n("/public/%2e%2e%2Fadmin"),
            Err(PathRejection::EncodedSlash)
        );
        assert_eq!(n("/a%5cb"), Err(PathRejection::EncodedBackslash));
        assert_eq!(n("/a%00"), Err(PathRejection::EncodedNul));
        assert_eq!(n("/a%2"), Err(PathRejection::BadEscape));
        assert_eq!(n("/a%zz"), Err(PathRejection::BadEscape));
        assert_eq!(n("/a%"), Err(PathRejection::BadEscape));
        assert_eq!(n("/public/..\\admin"), Err(PathRejection::Backslash));
        for p in [
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/public/%2e%2e;/admin",
            "/public/..%3b/admin",
            "/public/.;/../admin",
        ] {
            assert_eq!(n(p), Err(PathRejection::DotSegmentParameters), "{p}");
        }
        // Parameters on other segments are the application's business.
        assert_eq!(n("/a;b/..;c"), Err(PathRejection::DotSegmentParameters));
        assert_eq!(n("/a;b/c;d").as_deref(), Ok("/a;b/c;d"));
        assert_eq!(n("/a/...;b").as_deref(), Ok("/a/...;b"));
    }

    #[test]
    fn what_is_already_normal_is_borrowed_and_kept() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/a%20b",
            "/caf%C3%A9",
            "/é",
            "/a.b/.c",
            "*",
        ] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn other_cases() {
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/a/b/."), Ok("/a/b/".into()));
        assert_eq!(n("/.."), Ok("/".into()));
        assert_eq!(n("/a%2d%7e%5f"), Ok("/a-~_".into()));
        // Reserved characters stay encoded, hex in upper case.
        assert_eq!(n("/a%3fb%3a"), Ok("/a%3Fb%3A".into()));
        assert_eq!(n("/a%20b"), Ok("/a%20b".into()));
    }

    /// Whatever comes in, what goes out is normal: normalising it again
    /// changes nothing, and it has no `.`/`..` segment, no `//`, no
    /// encoded unreserved character.
    #[test]
    fn the_result_is_a_fixed_point() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let pieces = [
            "/", ".", "..", "a", "%2e", "%2E", "%41", "%20", "%", "b", "//",
        ];
        let mut accepted = 0;
        for _ in 0..20_000 {
            let len = rng.random_range(0..10);
            let mut p = String::from("/");
            for _ in 0..len {
                p.push_str(pieces[rng.random_range(0..pieces.len())]);
            }
            let Ok(once) = n(&p) else { continue };
            accepted += 1;
            assert_eq!(n(&once).as_deref(), Ok(once.as_str()), "{p}");
            assert!(once.starts_with('/'), "{p} -> {once}");
            assert!(!once.contains("//"), "{p} -> {once}");
            for seg in once.split('/') {
                assert!(seg != "." && seg != "..", "{p} -> {once}");
            }
            assert!(
                !once.contains("%2E") && !once.contains("%41"),
                "{p} -> {once}"
            );
        }
        assert!(accepted > 5_000, "{accepted}");
    }
}
