//! Every request's path in its one normal spelling before anything looks
//! at it (routes, route-level authorization) and before it is forwarded:
//! see [`weft_destination_api::routing::normalize_path`] for the rules.

use http::Request;
use http::uri::{PathAndQuery, Uri};
pub use weft_destination_api::routing::PathRejection;
use weft_destination_api::routing::normalize_path;

/// Rewrites `request`'s path to its normal spelling (the query is kept as
/// it is); an ambiguous path is refused and left untouched.
pub fn normalize<B>(request: &mut Request<B>) -> Result<(), PathRejection> {
    let uri = request.uri();
    let normal = match normalize_path(uri.path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    // Normal paths are made of what was a valid path already (decoded
    // characters are unreserved): this parse cannot fail; if it did, the
    // request is refused rather than forwarded unnormalised.
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| PathRejection::BadEscape)?);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| PathRejection::BadEscape)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_rewritten_and_the_query_and_authority_kept() {
        let mut r = Request::get("http://web.demo:8080/public/%2e%2e//admin?x=%2e%2e&y=1")
            .body(())
            .unwrap();
        normalize(&mut r).unwrap();
        assert_eq!(
            r.uri().to_string(),
            "http://web.demo:8080/admin?x=%2e%2e&y=1"
        );
        let mut origin = Request::get("/a/./b").body(()).unwrap();
        normalize(&mut origin).unwrap();
        assert_eq!(origin.uri().to_string(), "/a/b");
    }

    #[test]
    fn a_refused_path_is_left_as_it_came() {
        let mut r = Request::get("/public/..%2fadmin").body(()).unwrap();
        assert_eq!(normalize(&mut r), Err(PathRejection::EncodedSlash));
        assert_eq!(r.uri().path(), "/public/..%2fadmin");
    }
}
