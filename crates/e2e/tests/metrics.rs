//! The metrics endpoints serve what operators alert on, and the numbers
//! move when the saga runs. (Its own test binary: the registry is
//! per process, and other tests would move it.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, Svc, Tuning, cluster::Cluster, fixtures::*, tenant};
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

/// Capacity at a glance comes from the resource pool alone — in separate
/// processes, the allocation service and the viewer export none of it —
/// and health checks and reflection are not counted as API requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_metrics_come_from_the_resource_pool_only() {
    use gpualloc_proto::allocation::v1 as apb;
    let mut cluster = Cluster::start(env!("CARGO_BIN_EXE_mesh-node"), 1).await;
    cluster.put_pool("p", gpu_capacity(&[("A100", 4)])).await;
    cluster.set_quota("t", gpus(8, "")).await;
    cluster.allocations()[0]
        .create_allocation(tenant(
            "t",
            apb::CreateAllocationRequest {
                tenant: "t".into(),
                resources: Some(gpus(3, "A100")),
                request_id: "capacity-1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let pool = cluster.node(Svc::ResourcePool, 0).metrics_addr();
    let text = eventually(DEADLINE, "capacity sampled after the grant", || async {
        let text = scrape(&pool).await;
        let free = metric(
            &text,
            "gpualloc_pool_free",
            &[("pool", "p"), ("class", "gpus.A100")],
        );
        (has_metric(&text, "gpualloc_pool_free") && free == 1.0).then_some(text)
    })
    .await;
    let gpu = [("pool", "p"), ("class", "gpus.A100")];
    assert_eq!(metric(&text, "gpualloc_pool_capacity", &gpu), 4.0, "{text}");
    assert_eq!(metric(&text, "gpualloc_pool_usage", &gpu), 3.0, "{text}");
    let quota = [("tenant", "t"), ("class", "gpus")];
    assert_eq!(
        metric(&text, "gpualloc_tenant_quota", &quota),
        8.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "gpualloc_tenant_usage", &quota),
        3.0,
        "{text}"
    );
    assert!(has_metric(&text, "gpualloc_hold_queue_depth"), "{text}");

    for kind in [Svc::Allocation, Svc::Viewer] {
        let addr = cluster.node(kind, 0).metrics_addr();
        // A health check first: it must not show up as an API request.
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(cluster.node(kind, 0).channel());
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        let text = scrape(&addr).await;
        for name in [
            "gpualloc_hold_queue_depth",
            "gpualloc_pool_",
            "gpualloc_tenant_",
        ] {
            assert!(!text.contains(name), "{kind:?} exports {name}:\n{text}");
        }
        assert!(
            !text.contains("grpc.health"),
            "{kind:?} counts health checks:\n{text}"
        );
    }
    // Each service exports its own metrics and only those: the breaker and
    // the quota checks are the allocation service's, notifications the
    // viewer's.
    let mut scrape_of = |kind: Svc| cluster.node(kind, 0).metrics_addr();
    let allocation = scrape(&scrape_of(Svc::Allocation)).await;
    assert!(
        has_metric(&allocation, "gpualloc_breaker_state"),
        "{allocation}"
    );
    assert!(
        has_metric(&allocation, "gpualloc_check_quota_total"),
        "{allocation}"
    );
    for (kind, foreign) in [
        (Svc::ResourcePool, "gpualloc_breaker_state"),
        (Svc::ResourcePool, "gpualloc_notifications"),
        (Svc::Viewer, "gpualloc_check_quota"),
        (Svc::Viewer, "gpualloc_saga_transitions"),
    ] {
        let text = scrape(&scrape_of(kind)).await;
        assert!(
            !text.contains(foreign),
            "{kind:?} exports {foreign}:\n{text}"
        );
    }
}
