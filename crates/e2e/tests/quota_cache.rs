//! CheckQuota answers from memory, and a tenant still never sees its own
//! changes late: writes through the replica it asks show at once however long
//! the cache may keep an answer, and another replica's writes show within
//! the cache's lifetime.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, Service, Svc, Tuning, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::State,
    resourcepool::v1::{self as rp, resource_pool_service_client::ResourcePoolServiceClient},
};
use gpualloc_testkit::eventually;
use tonic::transport::Channel;

async fn check(
    client: &ResourcePoolServiceClient<Channel>,
    t: &str,
    n: i32,
) -> rp::CheckQuotaResponse {
    client
        .clone()
        .check_quota(tenant(
            t,
            rp::CheckQuotaRequest {
                tenant: t.into(),
                resources: Some(gpus(n, "A100")),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

fn verdict(r: &rp::CheckQuotaResponse) -> rp::Verdict {
    rp::Verdict::try_from(r.verdict).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_writes_show_at_once_even_when_answers_may_be_kept_an_hour() {
    let tuning = Tuning {
        quota_cache_ttl: Duration::from_secs(3600),
        ..Tuning::default()
    };
    let mesh = Mesh::start_tuned(Backend::Sqlite, tuning).await;
    let t = "team";
    let pools = mesh.pools();
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;

    // No quota yet, and that answer is kept …
    assert_eq!(
        verdict(&check(&pools, t, 4).await),
        rp::Verdict::ExceedsQuota
    );
    assert_eq!(
        verdict(&check(&pools, t, 4).await),
        rp::Verdict::ExceedsQuota
    );
    // … until the quota is set.
    set_quota(&mesh, t, gpus(4, "")).await;
    let r = check(&pools, t, 4).await;
    assert_eq!(verdict(&r), rp::Verdict::Allowed, "{r:?}");
    assert_eq!(verdict(&check(&pools, t, 4).await), rp::Verdict::Allowed);

    // Lowering it shows at once.
    set_quota(&mesh, t, gpus(2, "")).await;
    let r = check(&pools, t, 4).await;
    assert_eq!(verdict(&r), rp::Verdict::ExceedsQuota, "{r:?}");

    // The saga's grant (a write by the pool's consumer, not an RPC) shows
    // at once too: usage and the verdict.
    set_quota(&mesh, t, gpus(8, "")).await;
    assert_eq!(verdict(&check(&pools, t, 3).await), rp::Verdict::Allowed);
    let a = create(&mesh, t, gpus(6, "A100")).await;
    wait_state(&mesh, t, &a.allocation_id, State::Allocated).await;
    let r = check(&pools, t, 3).await;
    assert_eq!(verdict(&r), rp::Verdict::ExceedsQuota, "{r:?}");
    assert_eq!(r.usage.unwrap().gpus, 6);
    // Capacity left: 2 of 8 A100s.
    let r = check(&pools, t, 2).await;
    assert_eq!(verdict(&r), rp::Verdict::Allowed, "{r:?}");

    // A pool that shrinks: a second pool's capacity appears at once.
    put_pool(&mesh, "q", gpu_capacity(&[("A100", 0)])).await;
    set_quota(&mesh, t, gpus(16, "")).await;
    let r = check(&pools, t, 4).await;
    assert_eq!(verdict(&r), rp::Verdict::InsufficientCapacity, "{r:?}");
    put_pool(&mesh, "q", gpu_capacity(&[("A100", 4)])).await;
    let r = check(&pools, t, 4).await;
    assert_eq!(verdict(&r), rp::Verdict::Allowed, "{r:?}");
    assert_eq!(r.pool_id, "q");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_replicas_writes_show_within_the_cache_lifetime() {
    let ttl = Duration::from_millis(300);
    let mesh = Mesh::start(Backend::Postgres).await;
    // A second resource-pool replica on the same database.
    let b = Service::spawn_tuned(
        Svc::ResourcePool,
        mesh.pool.common.clone(),
        String::new(),
        None,
        Tuning {
            quota_cache_ttl: ttl,
            ..Tuning::default()
        },
    )
    .await;
    b.wait_serving().await;
    let on_b = ResourcePoolServiceClient::new(b.channel());
    let t = "team";
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, t, gpus(4, "")).await;
    let r = eventually(Duration::from_secs(10), "replica B allows 4", || async {
        let r = check(&on_b, t, 4).await;
        (verdict(&r) == rp::Verdict::Allowed).then_some(r)
    })
    .await;
    assert_eq!(r.quota.unwrap().gpus, 4);

    // Lowered through replica A: B follows without any write of its own.
    set_quota(&mesh, t, gpus(2, "")).await;
    let r = eventually(
        Duration::from_secs(10),
        "replica B sees the lower quota",
        || async {
            let r = check(&on_b, t, 4).await;
            (verdict(&r) == rp::Verdict::ExceedsQuota).then_some(r)
        },
    )
    .await;
    assert_eq!(r.quota.unwrap().gpus, 2);
}
