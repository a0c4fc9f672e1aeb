//! Overload and deadlines as clients see them: load shedding with a retry
//! pushback while health checks keep answering, and DEADLINE_EXCEEDED
//! (not UNKNOWN or CANCELLED) past the server's request timeout.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use gpualloc_allocation::breaker::BreakerConfig;
use gpualloc_e2e::{Backend, Mesh, Service, Svc, Tuning, fixtures::*, tenant};
use gpualloc_proto::allocation::v1::{self as apb, State};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A "pool" that accepts connections and never answers.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_politely_and_the_service_stays_healthy() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    let t = "team";
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 64)])).await;
    set_quota(&mesh, t, gpus(1_000, "")).await;
    // Each create waits for a pool that never answers (300 ms), so they
    // pile up; at most 4 are handled at once.
    let (hole, _hole) = black_hole().await;
    mesh.allocation.stop().await;
    let mut common = mesh.allocation.common.clone();
    common.max_concurrent_requests = 4;
    let tuning = Tuning {
        breaker: BreakerConfig {
            failures: 1_000,
            ..BreakerConfig::default()
        },
        ..Tuning::default()
    };
    mesh.allocation = Service::spawn_tuned(Svc::Allocation, common, hole, None, tuning).await;
    mesh.allocation.wait_serving().await;

    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut client = mesh.allocations();
            tokio::spawn(async move {
                client
                    .create_allocation(tenant(
                        "team",
                        apb::CreateAllocationRequest {
                            tenant: "team".into(),
                            resources: Some(gpus(1, "A100")),
                            ..Default::default()
                        },
                    ))
                    .await
            })
        })
        .collect();
    // While they are in progress the service answers its health checks.
    assert_eq!(mesh.allocation.health().await, Some(ServingStatus::Serving));
    let (mut ok, mut shed) = (Vec::new(), 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(r) => ok.push(r.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let pushback = status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                assert!(pushback.is_some_and(|ms| ms > 0), "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(shed > 0, "nothing was shed");
    assert!(ok.len() >= 4, "only {} accepted", ok.len());
    // What was accepted is stored and goes on (the pool proper is reached
    // through the saga).
    for a in &ok {
        assert_eq!(a.state, State::Pending as i32);
        wait_state(&mesh, t, &a.allocation_id, State::Allocated).await;
    }
    assert_eq!(mesh.allocation.health().await, Some(ServingStatus::Serving));
    assert!(try_create(&mesh, t, 1).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_past_the_servers_deadline_gets_deadline_exceeded() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    let t = "team";
    set_quota(&mesh, t, gpus(10, "")).await;
    let (hole, _hole) = black_hole().await;
    mesh.allocation.stop().await;
    let mut common = mesh.allocation.common.clone();
    common.request_timeout = Duration::from_millis(100);
    mesh.allocation =
        Service::spawn_tuned(Svc::Allocation, common, hole, None, Tuning::default()).await;
    mesh.allocation.wait_serving().await;
    let err = try_create(&mesh, t, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("request timeout"), "{err:?}");
    // Cut off before it stored anything.
    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_message_is_refused_and_changes_nothing() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    let t = "team";
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, t, gpus(8, "")).await;
    mesh.allocation.stop().await;
    let mut common = mesh.allocation.common.clone();
    common.max_message_bytes = 2048;
    let pool_url = mesh.pool.url();
    mesh.allocation =
        Service::spawn_tuned(Svc::Allocation, common, pool_url, None, Tuning::default()).await;
    mesh.allocation.wait_serving().await;
    let big = apb::CreateAllocationRequest {
        tenant: t.into(),
        resources: Some(gpus(1, "A100")),
        labels: (0..16)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect(),
        ..Default::default()
    };
    let err = mesh
        .allocations()
        .create_allocation(tenant(t, big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("2048"), "{err:?}");
    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        0
    );
    // A normal request still goes through.
    assert!(try_create(&mesh, t, 1).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_rate_is_slowed_down_and_others_are_not() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 1_000)])).await;
    for t in ["noisy", "quiet"] {
        set_quota(&mesh, t, gpus(1_000, "")).await;
    }
    mesh.allocation.stop().await;
    let mut common = mesh.allocation.common.clone();
    // One request per second, bursts of three: the test's quick requests
    // outrun it by far.
    common.tenant_rate_limit = 1.0;
    common.tenant_burst = 3;
    let pool_url = mesh.pool.url();
    mesh.allocation =
        Service::spawn_tuned(Svc::Allocation, common, pool_url, None, Tuning::default()).await;
    mesh.allocation.wait_serving().await;

    let (mut ok, mut limited) = (0, 0);
    for _ in 0..10 {
        match try_create(&mesh, "noisy", 1).await {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("noisy"), "{status:?}");
                let pushback: u64 = status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=1_000).contains(&pushback), "{pushback}");
                limited += 1;
            }
        }
    }
    assert!((3..=4).contains(&ok), "{ok} got through");
    assert_eq!(ok + limited, 10);
    // Another tenant has its own bucket; health checks have none.
    for _ in 0..3 {
        try_create(&mesh, "quiet", 1).await.unwrap();
    }
    assert_eq!(mesh.allocation.health().await, Some(ServingStatus::Serving));
    // Refused requests stored nothing.
    assert_eq!(
        count(
            &mesh.allocation_db,
            "SELECT COUNT(*) AS n FROM allocations WHERE tenant = 'noisy'"
        )
        .await,
        ok
    );
}
