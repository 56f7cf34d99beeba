use super::*;
use weft_destination_api::RouteRetry;

fn policy(codes: &[u32], attempts: u32) -> RouteRetry {
    RouteRetry {
        codes: codes.to_vec(),
        attempts,
        backoff_ms: 0,
        grpc_codes: Vec::new(),
    }
}

#[test]
fn grpc_statuses_are_retried_by_the_default_set_or_the_listed_ones() {
    use http::Method;
    let default = policy(&[], 1);
    for (code, retried) in [
        (14, true),
        (8, true),
        (4, true),
        (1, true),
        (13, false),
        (5, false),
    ] {
        assert_eq!(
            should_retry(&default, &Method::POST, true, 0, Outcome::Grpc(code)),
            retried,
            "grpc-status {code} with the default set"
        );
    }
    let listed = RouteRetry {
        grpc_codes: vec![13],
        ..policy(&[], 1)
    };
    assert!(should_retry(
        &listed,
        &Method::POST,
        true,
        0,
        Outcome::Grpc(13)
    ));
    assert!(!should_retry(
        &listed,
        &Method::POST,
        true,
        0,
        Outcome::Grpc(14)
    ));
    assert!(
        !should_retry(&listed, &Method::POST, false, 0, Outcome::Grpc(13)),
        "body too large to replay"
    );
    assert!(!should_retry(
        &listed,
        &Method::POST,
        true,
        1,
        Outcome::Grpc(13)
    ));
}

#[test]
fn which_failures_are_retried() {
    use http::Method;
    let any_5xx = policy(&[], 2);
    assert!(should_retry(
        &any_5xx,
        &Method::GET,
        true,
        0,
        Outcome::Status(503)
    ));
    assert!(should_retry(
        &any_5xx,
        &Method::POST,
        true,
        1,
        Outcome::Status(500)
    ));
    assert!(
        !should_retry(&any_5xx, &Method::GET, true, 2, Outcome::Status(503)),
        "attempts used up"
    );
    assert!(!should_retry(
        &any_5xx,
        &Method::GET,
        true,
        0,
        Outcome::Status(404)
    ));
    assert!(
        !should_retry(&any_5xx, &Method::GET, false, 0, Outcome::Status(503)),
        "body too large to replay"
    );

    let listed = policy(&[502], 1);
    assert!(should_retry(
        &listed,
        &Method::GET,
        true,
        0,
        Outcome::Status(502)
    ));
    assert!(!should_retry(
        &listed,
        &Method::GET,
        true,
        0,
        Outcome::Status(503)
    ));

    // A request that never reached the backend is always safe to retry; one
    // that may have been processed only if idempotent.
    assert!(should_retry(
        &listed,
        &Method::POST,
        true,
        0,
        Outcome::ConnectFailed
    ));
    assert!(should_retry(
        &listed,
        &Method::PUT,
        true,
        0,
        Outcome::ResponseFailed
    ));
    assert!(!should_retry(
        &listed,
        &Method::POST,
        true,
        0,
        Outcome::ResponseFailed
    ));
}
