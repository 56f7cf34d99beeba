use super::*;

fn budget() -> RetryBudget {
    RetryBudget::new(BudgetConfig {
        ratio: 0.2,
        min_per_second: 1,
        window: Duration::from_secs(10),
    })
}

/// Retries taken until the budget says no (bounded).
fn drain(b: &RetryBudget) -> u32 {
    let mut n = 0;
    while n < 10_000 && b.try_retry() {
        n += 1;
    }
    n
}

#[tokio::test(start_paused = true)]
async fn the_floor_allows_a_few_retries_without_traffic() {
    let b = budget();
    // 1 per second over a 10 s window.
    assert_eq!(drain(&b), 10);
}

#[tokio::test(start_paused = true)]
async fn retries_add_at_most_twenty_percent_of_the_requests() {
    let b = budget();
    for _ in 0..1000 {
        b.request();
    }
    // 10 (floor) + 20 % of 1000.
    assert_eq!(drain(&b), 210);
    // More requests earn more retries, at the same ratio.
    for _ in 0..100 {
        b.request();
    }
    assert_eq!(drain(&b), 20);
}

#[tokio::test(start_paused = true)]
async fn the_window_forgets_old_requests_and_retries() {
    let b = budget();
    for _ in 0..1000 {
        b.request();
    }
    assert_eq!(drain(&b), 210);
    tokio::time::advance(Duration::from_secs(5)).await;
    // Still within the window: nothing new.
    assert_eq!(drain(&b), 0);
    tokio::time::advance(Duration::from_secs(6)).await;
    // Requests and retries of 11 s ago are gone: only the floor is left.
    assert_eq!(drain(&b), 10);
}

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
