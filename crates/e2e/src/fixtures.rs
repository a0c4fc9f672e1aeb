//! Small helpers the end-to-end tests share.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use diesel::{QueryableByName, RunQueryDsl, sql_query, sql_types::BigInt};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    events::v1 as ev,
    resourcepool::v1::{self as rp, resource_pool_service_client::ResourcePoolServiceClient},
    viewer::v1 as vpb,
};
use gpualloc_saga::subjects;
use gpualloc_storage::{Db, DbError, DbOptions};
use gpualloc_testkit::{TestDb, eventually};
use prost::Message;
use tonic::transport::Channel;

use crate::{Mesh, admin, tenant};

/// How long a saga may take to settle in these tests.
pub const SETTLE: Duration = Duration::from_secs(20);

pub fn gpus(n: i32, model: &str) -> rp::Resources {
    rp::Resources {
        gpus: n,
        gpu_model: model.into(),
        ..Default::default()
    }
}

/// Resources as a forged event carries them.
pub fn event_resources(r: rp::Resources) -> ev::Resources {
    ev::Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
        gpu_model: r.gpu_model,
        storage_gib: r.storage_gib,
        custom: r.custom,
    }
}

/// An allocation a test read from the API, as a forged
/// `AllocationStateChanged` would carry it.
pub fn event_snapshot(a: &apb::Allocation) -> ev::AllocationSnapshot {
    ev::AllocationSnapshot {
        allocation_id: a.allocation_id.clone(),
        tenant: a.tenant.clone(),
        resources: a.resources.clone().map(event_resources),
        state: a.state,
        reason: a.reason.clone(),
        pool: a.pool.clone(),
        priority: a.priority,
        request_id: a.request_id.clone(),
        labels: a.labels.clone(),
        version: a.version,
        create_time: a.create_time,
        update_time: a.update_time,
        expire_time: a.expire_time,
        lease: a.lease,
        display_name: a.display_name.clone(),
        end_time: a.end_time,
    }
}

pub fn custom(class: &str, n: i64) -> rp::Resources {
    rp::Resources {
        custom: BTreeMap::from([(class.to_owned(), n)]),
        ..Default::default()
    }
}

pub async fn put_pool(mesh: &Mesh, id: &str, capacity: rp::Capacity) -> rp::Pool {
    put_pool_at(mesh.pools(), id, capacity).await
}

/// [`put_pool`] on a resource pool of a test's own making.
pub async fn put_pool_at(
    mut pools: ResourcePoolServiceClient<Channel>,
    id: &str,
    capacity: rp::Capacity,
) -> rp::Pool {
    pools
        .put_pool(admin(rp::PutPoolRequest {
            update_mask: None,
            pool: Some(rp::Pool {
                pool_id: id.into(),
                capacity: Some(capacity),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner()
}

pub fn gpu_capacity(models: &[(&str, i32)]) -> rp::Capacity {
    rp::Capacity {
        cpu_millis: 64_000,
        memory_mib: 512 * 1024,
        storage_gib: 10_000,
        gpus_by_model: models.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect(),
        custom: BTreeMap::new(),
    }
}

pub async fn set_quota(mesh: &Mesh, t: &str, limits: rp::Resources) -> rp::TenantQuota {
    set_quota_at(mesh.pools(), t, limits).await
}

/// [`set_quota`] on a resource pool of a test's own making.
pub async fn set_quota_at(
    mut pools: ResourcePoolServiceClient<Channel>,
    t: &str,
    limits: rp::Resources,
) -> rp::TenantQuota {
    pools
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: t.into(),
            limits: Some(limits),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

pub async fn create(mesh: &Mesh, t: &str, resources: rp::Resources) -> apb::Allocation {
    mesh.allocations()
        .create_allocation(tenant(
            t,
            apb::CreateAllocationRequest {
                tenant: t.into(),
                resources: Some(resources),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Creates `n` A100s for `t`, returning what the service answered.
pub async fn try_create(mesh: &Mesh, t: &str, n: i32) -> Result<apb::Allocation, tonic::Status> {
    mesh.allocations()
        .create_allocation(tenant(
            t,
            apb::CreateAllocationRequest {
                tenant: t.into(),
                resources: Some(gpus(n, "A100")),
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// Gives a service a metrics endpoint on a free port (use with
/// `Mesh::start_custom`).
pub fn with_metrics(c: &mut gpualloc_platform::CommonConfig) {
    c.metrics_listen = Some(format!("127.0.0.1:{}", gpualloc_testkit::free_port()));
}

/// Where a service started [`with_metrics`] serves them.
pub fn metrics_addr(s: &crate::Service) -> String {
    s.common.metrics_listen.clone().unwrap()
}

/// Polls GetAllocation until the allocation is in `state`.
pub async fn wait_state(mesh: &Mesh, t: &str, id: &str, state: State) -> apb::Allocation {
    eventually(SETTLE, &format!("{id} {state:?} in allocation"), || async {
        let a = mesh
            .allocations()
            .get_allocation(tenant(
                t,
                apb::GetAllocationRequest {
                    allocation_id: id.into(),
                },
            ))
            .await
            .ok()?
            .into_inner();
        (a.state == state as i32).then_some(a)
    })
    .await
}

/// Polls GetAllocationView until the view shows `state`.
pub async fn wait_view(mesh: &Mesh, t: &str, id: &str, state: State) -> vpb::AllocationView {
    eventually(SETTLE, &format!("{id} {state:?} in the viewer"), || async {
        let v = mesh
            .viewer()
            .get_allocation_view(tenant(
                t,
                vpb::GetAllocationViewRequest {
                    allocation_id: id.into(),
                },
            ))
            .await
            .ok()?
            .into_inner();
        (v.allocation.as_ref()?.state == state as i32).then_some(v)
    })
    .await
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A handle on a service's database, for checks from outside.
pub async fn open_db(db: &TestDb) -> Db {
    Db::connect(
        &db.url,
        DbOptions {
            pool_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Runs `SELECT COUNT(*) AS n …` on a service's database.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let handle = open_db(db).await;
    let sql = sql.to_owned();
    handle
        .read(move |c| Ok::<_, DbError>(sql_query(sql.clone()).get_result::<Count>(c)?.n))
        .await
        .unwrap()
}

/// Waits until a durable consumer has acknowledged everything in the stream.
pub async fn drained(mesh: &Mesh, durable: &str) {
    let js = mesh.jetstream().await;
    eventually(SETTLE, &format!("consumer {durable} drained"), || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream(durable, &mesh.stream)
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await
}

/// Waits until all three services have applied everything in the stream.
pub async fn all_drained(mesh: &Mesh) {
    for durable in ["resource-pool", "allocation", "viewer"] {
        drained(mesh, durable).await;
    }
}

/// Publishes a crafted event the way a relay would (message id = event id).
pub async fn publish(mesh: &Mesh, event: &ev::Event) {
    let payload = event.payload.as_ref().unwrap();
    publish_as(
        mesh,
        gpualloc_nats_acl::OPERATOR,
        subjects::of(payload),
        event,
    )
    .await
    .unwrap();
}

/// Publishes `event` on `subject` (relative to the mesh's prefix) as the
/// NATS user `user`, and waits for JetStream's acknowledgement (at most
/// two seconds: a publish the server refuses is never acknowledged).
pub async fn publish_as(
    mesh: &Mesh,
    user: &str,
    subject: &str,
    event: &ev::Event,
) -> Result<(), String> {
    let client = gpualloc_testkit::nats_connect_as(&mesh.nats_url, user)
        .await
        .map_err(|e| e.to_string())?;
    // Kept until the ack: dropping the last handle closes the connection.
    let js = async_nats::jetstream::new(client);
    let ack = js
        .send_publish(
            format!("{}.{subject}", mesh.prefix),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(event.encode_to_vec().into())
                .message_id(event.event_id.clone()),
        )
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(std::time::Duration::from_secs(2), ack).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("not acknowledged".into()),
    }
}

/// The stream's current configuration and state.
pub async fn stream_info(mesh: &Mesh) -> async_nats::jetstream::stream::Info {
    mesh.jetstream()
        .await
        .get_stream(&mesh.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

/// Every message in the test's stream that decodes as an event: (stream
/// sequence, subject, event).
pub async fn stream_events(mesh: &Mesh) -> Vec<(u64, String, ev::Event)> {
    let js = mesh.jetstream().await;
    let mut stream = js.get_stream(&mesh.stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        let event = ev::Event::decode(message.payload.clone()).unwrap();
        out.push((seq, message.subject.to_string(), event));
    }
    out
}

/// Every event in the stream: (stream messages, distinct event ids) per
/// allocation.
pub async fn events_per_allocation(mesh: &Mesh) -> BTreeMap<String, (usize, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
    for (_, _, event) in stream_events(mesh).await {
        if event.allocation_id.is_empty() {
            continue;
        }
        let entry = out.entry(event.allocation_id).or_default();
        entry.0 += 1;
        entry.1.insert(event.event_id);
    }
    out
}

pub async fn get(mesh: &Mesh, t: &str, id: &str) -> apb::Allocation {
    mesh.allocations()
        .get_allocation(tenant(
            t,
            apb::GetAllocationRequest {
                allocation_id: id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

pub async fn cancel(mesh: &Mesh, t: &str, id: &str) -> Result<apb::Allocation, tonic::Status> {
    mesh.allocations()
        .cancel_allocation(tenant(
            t,
            apb::CancelAllocationRequest {
                allocation_id: id.into(),
                reason: "test".into(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

pub async fn get_pool(mesh: &Mesh, id: &str) -> rp::Pool {
    mesh.pools()
        .get_pool(admin(rp::GetPoolRequest { pool_id: id.into() }))
        .await
        .unwrap()
        .into_inner()
}

pub async fn list_held(mesh: &Mesh, pool: &str) -> Vec<rp::HeldReservation> {
    mesh.pools()
        .list_held(admin(rp::ListHeldRequest {
            pool_id: pool.into(),
            tenant: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .held
}

/// Creates with every field of the request under the test's control.
pub async fn create_request(
    mesh: &Mesh,
    t: &str,
    request: apb::CreateAllocationRequest,
) -> apb::Allocation {
    mesh.allocations()
        .create_allocation(tenant(t, request))
        .await
        .unwrap()
        .into_inner()
}

/// `GET /metrics` from a service's metrics endpoint.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    socket.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The sum of the samples of `name` whose labels include `with`.
pub fn metric(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.split(',').any(|p| p == format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Whether `name` appears in the exposition at all.
pub fn has_metric(text: &str, name: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
}

/// A protobuf duration of `s` seconds (leases, hold limits).
pub fn seconds(s: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s,
        nanos: 0,
    }
}
