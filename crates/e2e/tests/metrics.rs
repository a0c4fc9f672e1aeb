//! The metrics endpoints serve what operators alert on, and the numbers
//! move when the saga runs. (Its own test binary: the registry is
//! per process, and other tests would move it.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, Tuning, fixtures::*};
use gpualloc_proto::allocation::v1::State;
use gpualloc_testkit::eventually;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_endpoints_serve_what_operators_alert_on() {
    let mesh = Mesh::start_custom(
        Backend::Sqlite,
        gpualloc_testkit::nats_url(),
        Tuning::default(),
        with_metrics,
    )
    .await;
    let t = "team";
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 1)])).await;
    set_quota(&mesh, t, gpus(10, "")).await;
    let before = scrape(&metrics_addr(&mesh.allocation)).await;
    let a = create(&mesh, t, gpus(1, "A100")).await;
    let b = create(&mesh, t, gpus(1, "A100")).await;
    wait_view(&mesh, t, &a.allocation_id, State::Allocated).await;
    wait_view(&mesh, t, &b.allocation_id, State::Held).await;
    all_drained(&mesh).await;

    for service in [&mesh.allocation, &mesh.pool, &mesh.viewer] {
        let text = scrape(&metrics_addr(service)).await;
        for name in [
            "gpualloc_rpc_requests_total",
            "gpualloc_rpc_duration_seconds_bucket",
            "gpualloc_saga_transitions_total",
            "gpualloc_hold_queue_depth",
            "gpualloc_outbox_backlog",
            "gpualloc_outbox_oldest_age_seconds",
            "gpualloc_consumer_pending",
            "gpualloc_consumer_redeliveries_total",
            "gpualloc_breaker_state",
        ] {
            // The redelivery counter appears with the first redelivery.
            if name == "gpualloc_consumer_redeliveries_total" {
                continue;
            }
            assert!(
                has_metric(&text, name),
                "{name} missing from {:?}:\n{text}",
                service.kind
            );
        }
    }
    let after = eventually(DEADLINE, "gauges sampled", || async {
        let text = scrape(&metrics_addr(&mesh.allocation)).await;
        (metric(&text, "gpualloc_hold_queue_depth", &[]) == 1.0).then_some(text)
    })
    .await;
    let moved = |name: &str, with: &[(&str, &str)]| {
        metric(&after, name, with) - metric(&before, name, with)
    };
    assert_eq!(
        moved(
            "gpualloc_rpc_requests_total",
            &[
                (
                    "method",
                    "/gpualloc.allocation.v1.AllocationService/CreateAllocation"
                ),
                ("code", "Ok")
            ]
        ),
        2.0
    );
    assert!(moved("gpualloc_saga_transitions_total", &[("state", "ALLOCATED")]) >= 1.0);
    assert!(moved("gpualloc_saga_transitions_total", &[("state", "HELD")]) >= 1.0);
    assert!(moved("gpualloc_consumer_events_total", &[("consumer", "viewer")]) >= 4.0);
    assert!(
        moved(
            "gpualloc_outbox_published_total",
            &[("service", "allocation")]
        ) >= 4.0
    );
    // Errors are counted by code.
    let err = try_create(&mesh, t, 100).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let text = scrape(&metrics_addr(&mesh.allocation)).await;
    assert!(
        metric(
            &text,
            "gpualloc_rpc_requests_total",
            &[
                (
                    "method",
                    "/gpualloc.allocation.v1.AllocationService/CreateAllocation"
                ),
                ("code", "FailedPrecondition")
            ]
        ) >= 1.0
    );
}
