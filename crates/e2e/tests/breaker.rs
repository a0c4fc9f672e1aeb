//! The CheckQuota circuit breaker as clients and operators see it:
//! requests keep being accepted while the pool is down, no call reaches
//! the pool while the breaker is open, quota denials never open it. (Its
//! own test binary: it reads the process's metrics, which other tests
//! would move.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use gpualloc_allocation::breaker::BreakerConfig;
use gpualloc_e2e::{Backend, Mesh, Tuning, fixtures::*};
use gpualloc_proto::allocation::v1::State;
use gpualloc_testkit::eventually;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);
const CHECK_QUOTA: &str = "/gpualloc.resourcepool.v1.ResourcePoolService/CheckQuota";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_accepted_while_the_pool_is_down_and_the_breaker_spares_it() {
    let tuning = Tuning {
        breaker: BreakerConfig {
            failures: 3,
            open_min: Duration::from_secs(6),
            open_max: Duration::from_secs(6),
            probes: 1,
        },
        ..Tuning::default()
    };
    let mut mesh = Mesh::start_custom(
        Backend::Sqlite,
        gpualloc_testkit::nats_url(),
        tuning,
        with_metrics,
    )
    .await;
    let t = "team";
    // Room for every create below, however many the polling makes.
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 100_000)])).await;
    set_quota(&mesh, t, gpus(50_000, "")).await;
    let metrics = metrics_addr(&mesh.allocation);
    let breaker = |text: &str| {
        metric(
            text,
            "gpualloc_breaker_state",
            &[("target", "resource-pool")],
        )
    };
    let calls_at_pool = |text: &str| {
        metric(
            text,
            "gpualloc_rpc_requests_total",
            &[("method", CHECK_QUOTA)],
        )
    };

    // Quota denials are answers: the breaker stays closed.
    let before = scrape(&metrics).await;
    for _ in 0..5 {
        let err = try_create(&mesh, t, 60_000).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("over quota"), "{err:?}");
    }
    let after = scrape(&metrics).await;
    assert_eq!(breaker(&after), 0.0);
    assert_eq!(calls_at_pool(&after) - calls_at_pool(&before), 5.0);

    // The pool stops: requests are still accepted (PENDING); after three
    // failed calls the breaker opens and the rest are not even tried.
    mesh.pool.stop().await;
    let mut accepted = Vec::new();
    for _ in 0..8 {
        let a = try_create(&mesh, t, 1).await.unwrap();
        assert_eq!(a.state, State::Pending as i32);
        accepted.push(a.allocation_id);
    }
    let open = scrape(&metrics).await;
    assert_eq!(breaker(&open), 1.0, "the breaker did not open");
    let rejected = metric(
        &open,
        "gpualloc_check_quota_total",
        &[("outcome", "breaker_open")],
    );
    assert!(rejected >= 5.0, "{rejected} rejected");
    // Refusing a call costs nothing measurable: every rejection took less
    // than 0.8 ms (the histogram bucket).
    let fast = metric(
        &open,
        "gpualloc_check_quota_duration_seconds_bucket",
        &[("outcome", "breaker_open"), ("le", "0.0008")],
    );
    assert_eq!(fast, rejected, "{open}");

    // The pool is back, but while the breaker is open no call reaches it.
    mesh.pool.start_again().await;
    mesh.pool.wait_serving().await;
    let quiet = calls_at_pool(&scrape(&metrics).await);
    for _ in 0..3 {
        accepted.push(try_create(&mesh, t, 1).await.unwrap().allocation_id);
    }
    let still = scrape(&metrics).await;
    assert_eq!(
        breaker(&still),
        1.0,
        "the open period ended before the check"
    );
    assert_eq!(
        calls_at_pool(&still),
        quiet,
        "a call reached the pool while open"
    );

    // After the open period a probe goes through and closes it.
    eventually(DEADLINE, "breaker closed", || async {
        // Each create is a chance to probe once the open period is over.
        try_create(&mesh, t, 1).await.unwrap();
        (breaker(&scrape(&metrics).await) == 0.0).then_some(())
    })
    .await;
    let closed = scrape(&metrics).await;
    assert!(calls_at_pool(&closed) > quiet);
    assert!(
        metric(
            &closed,
            "gpualloc_breaker_transitions_total",
            &[("to", "half_open")]
        ) >= 1.0
    );

    // Everything accepted while the pool was away is allocated.
    for id in &accepted {
        wait_state(&mesh, t, id, State::Allocated).await;
    }
}
