//! The mesh end to end: three real services, real JetStream, real
//! databases, real gRPC over sockets.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, Service, Svc, admin, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    events::v1 as ev,
    resourcepool::v1 as rp,
    viewer::v1 as vpb,
};
use gpualloc_testkit::{NatsServer, TestDb, eventually, free_port};
use prost::Message;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

async fn happy_path(backend: Backend) {
    let mesh = Mesh::start(backend).await;
    put_pool(&mesh, "gpu-a", gpu_capacity(&[("A100", 8)])).await;
    set_quota(
        &mesh,
        "team-a",
        rp::Resources {
            cpu_millis: 32_000,
            memory_mib: 65_536,
            gpus: 8,
            ..Default::default()
        },
    )
    .await;

    // Dry run first.
    let check = mesh
        .pools()
        .check_quota(tenant(
            "team-a",
            rp::CheckQuotaRequest {
                tenant: "team-a".into(),
                resources: Some(gpus(2, "A100")),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.verdict, rp::Verdict::Allowed as i32, "{check:?}");
    assert_eq!(check.pool_id, "gpu-a");

    let mut request = gpus(2, "A100");
    request.cpu_millis = 4000;
    let created = create(&mesh, "team-a", request).await;
    assert_eq!(created.state, State::Pending as i32);
    assert_eq!(created.version, 1);

    let done = wait_state(&mesh, "team-a", &created.allocation_id, State::Allocated).await;
    assert_eq!(done.pool, "gpu-a");
    let view = wait_view(&mesh, "team-a", &created.allocation_id, State::Allocated).await;
    assert_eq!(view.allocation.as_ref().unwrap().pool, "gpu-a");
    assert_eq!(view.allocation.unwrap().version, done.version);

    // The pool's counters moved, and the tenant's.
    let pool = mesh
        .pools()
        .get_pool(admin(rp::GetPoolRequest {
            pool_id: "gpu-a".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let usage = pool.usage.unwrap();
    assert_eq!(usage.gpus_by_model["A100"], 2);
    assert_eq!(usage.cpu_millis, 4000);
    let quota = mesh
        .pools()
        .get_tenant_quota(tenant(
            "team-a",
            rp::GetTenantQuotaRequest {
                tenant: "team-a".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.usage.unwrap().gpus, 2);

    // History in the viewer: created PENDING, then ALLOCATED.
    let history = mesh
        .viewer()
        .list_allocation_history(tenant(
            "team-a",
            vpb::ListAllocationHistoryRequest {
                allocation_id: created.allocation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let states: Vec<i32> = history.iter().map(|e| e.state).collect();
    assert_eq!(states, [State::Pending as i32, State::Allocated as i32]);

    // Another tenant sees nothing of it.
    let other = mesh
        .allocations()
        .get_allocation(tenant(
            "team-b",
            apb::GetAllocationRequest {
                allocation_id: created.allocation_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    let other = mesh
        .viewer()
        .get_allocation_view(tenant(
            "team-b",
            vpb::GetAllocationViewRequest {
                allocation_id: created.allocation_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);

    // Cancel: CANCELLING, then the pool releases and it ends CANCELLED.
    let cancelling = mesh
        .allocations()
        .cancel_allocation(tenant(
            "team-a",
            apb::CancelAllocationRequest {
                allocation_id: created.allocation_id.clone(),
                reason: "done".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelling.state, State::Cancelling as i32);
    wait_state(&mesh, "team-a", &created.allocation_id, State::Cancelled).await;
    wait_view(&mesh, "team-a", &created.allocation_id, State::Cancelled).await;
    let pool = mesh
        .pools()
        .get_pool(admin(rp::GetPoolRequest {
            pool_id: "gpu-a".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pool.usage
            .unwrap()
            .gpus_by_model
            .get("A100")
            .copied()
            .unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn happy_path_sqlite() {
    happy_path(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn happy_path_postgres() {
    happy_path(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_quota_fails_and_stores_nothing() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team-a", gpus(2, "")).await;

    let err = mesh
        .allocations()
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(gpus(3, "A100")),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let details = err.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "EXCEEDS_QUOTA");
    let violation = &details.quota_failure().unwrap().violations[0];
    assert_eq!(violation.subject, "gpus");

    // No pool anywhere could hold 9 GPUs: UNSATISFIABLE, also refused.
    set_quota(&mesh, "team-a", gpus(16, "")).await;
    let err = mesh
        .allocations()
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(gpus(9, "")),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_error_details().error_info().unwrap().reason,
        "UNSATISFIABLE"
    );

    // A valid allocation afterwards is the only one anywhere.
    let ok = create(&mesh, "team-a", gpus(1, "A100")).await;
    wait_view(&mesh, "team-a", &ok.allocation_id, State::Allocated).await;
    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        1
    );
    assert_eq!(
        count(
            &mesh.allocation_db,
            "SELECT COUNT(*) AS n FROM outbox WHERE subject = 'saga.allocation.requested'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&mesh.pool_db, "SELECT COUNT(*) AS n FROM reservations").await,
        1
    );
    let views = mesh
        .viewer()
        .list_allocation_views(tenant(
            "team-a",
            vpb::ListAllocationViewsRequest {
                tenant: "team-a".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(views.allocations.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_field_violations_and_changes_nothing() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let err = mesh
        .allocations()
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(rp::Resources {
                    cpu_millis: -1,
                    gpus: 0,
                    gpu_model: "A100".into(),
                    ..Default::default()
                }),
                priority: 5000,
                request_id: "has space".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "resources.cpu_millis",
            "resources.gpu_model",
            "request_id",
            "priority"
        ]
    );

    // No identity: UNAUTHENTICATED; someone else's tenant: PERMISSION_DENIED;
    // admin-only methods: PERMISSION_DENIED for tenants.
    let err = mesh
        .allocations()
        .create_allocation(apb::CreateAllocationRequest {
            tenant: "team-a".into(),
            resources: Some(gpus(1, "")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = mesh
        .allocations()
        .create_allocation(tenant(
            "team-b",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(gpus(1, "")),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = mesh
        .pools()
        .put_pool(tenant(
            "team-a",
            rp::PutPoolRequest {
                update_mask: None,
                pool: Some(rp::Pool {
                    pool_id: "p".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = mesh
        .allocations()
        .get_allocation(tenant(
            "team-a",
            apb::GetAllocationRequest {
                allocation_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        0
    );
    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM outbox").await,
        0
    );
    assert_eq!(
        count(&mesh.pool_db, "SELECT COUNT(*) AS n FROM pools").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_request_id_yields_one_allocation() {
    let mesh = Mesh::start(Backend::Postgres).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team-a", gpus(8, "")).await;
    let request = apb::CreateAllocationRequest {
        tenant: "team-a".into(),
        resources: Some(gpus(1, "")),
        request_id: "3f0c7a1e-retry-me".into(),
        ..Default::default()
    };
    // Concurrent retries, as a client with a short deadline would send.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut client = mesh.allocations();
        let r = request.clone();
        calls.push(tokio::spawn(async move {
            client.create_allocation(tenant("team-a", r)).await
        }));
    }
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.unwrap().unwrap().into_inner().allocation_id);
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "one request id produced several allocations: {ids:?}"
    );
    wait_state(&mesh, "team-a", &ids[0], State::Allocated).await;
    let again = mesh
        .allocations()
        .create_allocation(tenant("team-a", request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.allocation_id, ids[0]);
    assert_eq!(
        again.state,
        State::Allocated as i32,
        "a replay returns the allocation as it is now"
    );

    // The same key with different parameters is refused.
    let mut changed = request.clone();
    changed.resources = Some(gpus(2, ""));
    let err = mesh
        .allocations()
        .create_allocation(tenant("team-a", changed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_error_details().error_info().unwrap().reason,
        "IDEMPOTENCY_KEY_REUSED"
    );

    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        1
    );
    assert_eq!(
        count(&mesh.pool_db, "SELECT COUNT(*) AS n FROM reservations").await,
        1
    );
    let pool = mesh
        .pools()
        .get_pool(admin(rp::GetPoolRequest {
            pool_id: "p".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pool.usage.unwrap().gpus_by_model["A100"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_event_changes_nothing() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team-a", gpus(8, "")).await;
    let a = create(&mesh, "team-a", gpus(2, "A100")).await;
    wait_view(&mesh, "team-a", &a.allocation_id, State::Allocated).await;
    for durable in ["resource-pool", "allocation", "viewer"] {
        drained(&mesh, durable).await;
    }

    // Publish every event of the stream again under new message ids (as a
    // replay after the duplicate window would): each consumer gets each
    // event a second time.
    let js = mesh.jetstream().await;
    let stream = js.get_stream(&mesh.stream).await.unwrap();
    let last = stream.cached_info().state.last_sequence;
    let mut republished = 0;
    for seq in 1..=last {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        let event = ev::Event::decode(message.payload.clone()).unwrap();
        js.send_publish(
            message.subject.to_string(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(format!("replay-{}", event.event_id)),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        republished += 1;
    }
    assert!(
        republished >= 4,
        "expected the saga's events in the stream, found {republished}"
    );
    for durable in ["resource-pool", "allocation", "viewer"] {
        drained(&mesh, durable).await;
    }

    let now = mesh
        .allocations()
        .get_allocation(tenant(
            "team-a",
            apb::GetAllocationRequest {
                allocation_id: a.allocation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.state, State::Allocated as i32);
    assert_eq!(now.version, 2, "a duplicate moved the state machine");
    let pool = mesh
        .pools()
        .get_pool(admin(rp::GetPoolRequest {
            pool_id: "p".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pool.usage.unwrap().gpus_by_model["A100"],
        2,
        "a duplicate request was granted twice"
    );
    assert_eq!(
        count(&mesh.pool_db, "SELECT COUNT(*) AS n FROM reservations").await,
        1
    );
    assert_eq!(
        count(
            &mesh.viewer_db,
            "SELECT COUNT(*) AS n FROM allocation_history"
        )
        .await,
        2
    );
    // Nothing new was emitted by anyone.
    let after = js
        .get_stream(&mesh.stream)
        .await
        .unwrap()
        .cached_info()
        .state
        .last_sequence;
    assert_eq!(after, last + republished, "a duplicate caused new events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_waits_for_database_and_nats() {
    // NATS is not running yet on this port.
    let port = free_port();
    let db = TestDb::sqlite();
    let common = gpualloc_e2e::common_config(&db.url, &format!("nats://127.0.0.1:{port}"))
        .with_stream("HEALTHT", "healtht");
    let mut svc = Service::spawn(Svc::ResourcePool, common, String::new(), None).await;
    let status = eventually(Duration::from_secs(10), "a health answer", || async {
        svc.health().await
    })
    .await;
    assert_eq!(status, ServingStatus::NotServing);
    // The database is ready quickly, but without NATS it stays NOT_SERVING.
    let pools = gpualloc_proto::resourcepool::v1::resource_pool_service_client::ResourcePoolServiceClient::new(svc.channel());
    eventually(Duration::from_secs(10), "database ready", || {
        let mut p = pools.clone();
        async move {
            p.list_pools(admin(rp::ListPoolsRequest::default()))
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    assert_eq!(svc.health().await, Some(ServingStatus::NotServing));

    let _nats = NatsServer::start_on(port);
    svc.wait_serving().await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mesh = Mesh::start(Backend::Sqlite).await;
    for (svc, expected) in [
        (&mesh.allocation, "gpualloc.allocation.v1.AllocationService"),
        (&mesh.pool, "gpualloc.resourcepool.v1.ResourcePoolService"),
        (&mesh.viewer, "gpualloc.viewer.v1.ViewerService"),
    ] {
        let mut client = ServerReflectionClient::new(svc.channel());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection answer");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        // Only what this process serves: `grpcurl list` must not suggest
        // the viewer lives on the allocation port.
        assert_eq!(
            names,
            [expected, "grpc.health.v1.Health"].map(String::from),
            "{names:?}"
        );
    }
}
