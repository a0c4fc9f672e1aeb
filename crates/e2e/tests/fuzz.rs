//! Wire-level fuzzing of the running services. Proptest generates
//! well-framed but hostile messages — extreme numbers, empty, huge and
//! non-ASCII strings, many map entries, unknown enum values, durations
//! out of range — for every RPC of the descriptor set, and forged events
//! for every consumer. Properties, on PostgreSQL:
//!
//! - no RPC answers `UNKNOWN` or `INTERNAL`, and a refused create, pool or
//!   quota stores nothing;
//! - every consumer acknowledges every forged event (nothing is
//!   redelivered forever), and none that contradicts what is stored
//!   changes it;
//! - afterwards every service is SERVING, I1 holds (the pool's counters
//!   equal its grants and stay within capacity and quota) and I4 holds
//!   (the viewer equals the allocation service).
//!
//! The seed is fixed so that CI is repeatable; `GPUALLOC_FUZZ_CASES`
//! scales the run (cases per RPC; default 24) and `GPUALLOC_FUZZ_SEED`
//! explores other inputs.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, time::Duration};

use gpualloc_e2e::{
    Backend, Mesh, Svc,
    cluster::{audit_i1, rows},
    fixtures::*,
    raw,
};
use gpualloc_proto::{
    allocation::v1 as apb, events::v1 as ev, resourcepool::v1 as rp, viewer::v1 as vpb,
};
use gpualloc_saga::{Payload, subjects};
use gpualloc_testkit::{auth, eventually};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use prost::Message;
use tonic::Code;

fn cases() -> u32 {
    std::env::var("GPUALLOC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

fn runner() -> TestRunner {
    let seed: u64 = std::env::var("GPUALLOC_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6770_7561_6c6c_6f63);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// Strings a hostile client sends: empty, plausible, unicode, control
/// characters, huge.
/// Update masks: none, or paths that are real, near misses or noise.
fn mask() -> impl Strategy<Value = Option<prost_types::FieldMask>> {
    let path = prop_oneof![
        Just("*".to_owned()),
        Just("limits.gpus".to_owned()),
        Just("capacity".to_owned()),
        Just("max_hold".to_owned()),
        Just("usage".to_owned()),
        text(),
    ];
    proptest::option::of(
        proptest::collection::vec(path, 0..4).prop_map(|paths| prost_types::FieldMask { paths }),
    )
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("team-a".to_owned()),
        Just("team-b".to_owned()),
        Just("A100".to_owned()),
        "[a-z][a-z0-9-]{0,20}",
        "\\PC{0,40}",
        "[\\x00-\\x1f]{1,8}",
        (1usize..200_000).prop_map(|n| "é".repeat(n / 2 + 1)),
        Just(uuid::Uuid::now_v7().to_string()),
    ]
    .boxed()
}

fn int64() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(-1),
        Just(0),
        Just(1),
        Just(1_000_000_000_000_000),
        Just(1_000_000_000_000_001),
        Just(i64::MAX),
        0i64..100_000,
        any::<i64>(),
    ]
    .boxed()
}

fn int32() -> BoxedStrategy<i32> {
    prop_oneof![
        Just(i32::MIN),
        Just(-1),
        Just(0),
        Just(1),
        Just(1000),
        Just(1001),
        Just(i32::MAX),
        0i32..16,
        any::<i32>(),
    ]
    .boxed()
}

fn int_map() -> BoxedStrategy<BTreeMap<String, i64>> {
    prop::collection::btree_map(text(), int64(), 0..80).boxed()
}

fn resources() -> BoxedStrategy<Option<rp::Resources>> {
    prop::option::of(
        (int64(), int64(), int32(), text(), int64(), int_map()).prop_map(
            |(cpu_millis, memory_mib, gpus, gpu_model, storage_gib, custom)| rp::Resources {
                cpu_millis,
                memory_mib,
                gpus,
                gpu_model,
                storage_gib,
                custom,
            },
        ),
    )
    .boxed()
}

fn capacity() -> BoxedStrategy<Option<rp::Capacity>> {
    prop::option::of(
        (
            int64(),
            int64(),
            int64(),
            prop::collection::btree_map(text(), int32(), 0..20),
            int_map(),
        )
            .prop_map(
                |(cpu_millis, memory_mib, storage_gib, gpus_by_model, custom)| rp::Capacity {
                    cpu_millis,
                    memory_mib,
                    storage_gib,
                    gpus_by_model,
                    custom,
                },
            ),
    )
    .boxed()
}

fn duration() -> BoxedStrategy<Option<prost_types::Duration>> {
    prop::option::of(
        (int64(), int32()).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
    .boxed()
}

fn timestamp() -> BoxedStrategy<prost_types::Timestamp> {
    (int64(), int32())
        .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos })
        .boxed()
}

fn encoded<M: Message + 'static>(s: impl Strategy<Value = M> + 'static) -> BoxedStrategy<Vec<u8>> {
    s.prop_map(|m| m.encode_to_vec()).boxed()
}

/// A hostile request for the method at `path`.
fn request(path: &str) -> BoxedStrategy<Vec<u8>> {
    let method = path.rsplit('/').next().unwrap_or_default().to_owned();
    match method.as_str() {
        "CreateAllocation" => encoded(
            (
                text(),
                resources(),
                text(),
                int32(),
                duration(),
                prop::collection::btree_map(text(), text(), 0..40),
                text(),
            )
                .prop_map(
                    |(tenant, resources, request_id, priority, lease, labels, display_name)| {
                        apb::CreateAllocationRequest {
                            tenant,
                            resources,
                            request_id,
                            priority,
                            lease,
                            labels,
                            display_name,
                        }
                    },
                ),
        ),
        "GetAllocation" => {
            encoded(text().prop_map(|allocation_id| apb::GetAllocationRequest { allocation_id }))
        }
        "CancelAllocation" | "RejectAllocation" => {
            encoded((text(), text()).prop_map(|(allocation_id, reason)| {
                apb::CancelAllocationRequest {
                    allocation_id,
                    reason,
                }
            }))
        }
        "RenewAllocation" => encoded((text(), duration()).prop_map(|(allocation_id, lease)| {
            apb::RenewAllocationRequest {
                allocation_id,
                lease,
            }
        })),
        "ApproveAllocation" => encoded(
            text().prop_map(|allocation_id| apb::ApproveAllocationRequest { allocation_id }),
        ),
        "CheckQuota" => encoded(
            (text(), resources())
                .prop_map(|(tenant, resources)| rp::CheckQuotaRequest { tenant, resources }),
        ),
        "PutPool" => encoded(
            prop::option::of((text(), capacity(), duration(), int64()).prop_map(
                |(pool_id, capacity, max_hold, version)| rp::Pool {
                    pool_id,
                    capacity,
                    max_hold,
                    version,
                    ..Default::default()
                },
            ))
            .prop_flat_map(|pool| {
                mask().prop_map(move |update_mask| rp::PutPoolRequest {
                    pool: pool.clone(),
                    update_mask,
                })
            }),
        ),
        "GetPool" | "DeletePool" => {
            encoded(text().prop_map(|pool_id| rp::GetPoolRequest { pool_id }))
        }
        "ListPools" => encoded(text().prop_map(|gpu_model| rp::ListPoolsRequest { gpu_model })),
        "SetTenantQuota" => encoded(
            (text(), resources(), resources(), duration(), mask()).prop_map(
                |(tenant, limits, approval_above, max_hold, update_mask)| {
                    rp::SetTenantQuotaRequest {
                        tenant,
                        limits,
                        approval_above,
                        max_hold,
                        update_mask,
                    }
                },
            ),
        ),
        "GetTenantQuota" | "GetTenantSummary" => {
            encoded(text().prop_map(|tenant| rp::GetTenantQuotaRequest { tenant }))
        }
        "ListHeld" => encoded(
            (text(), text()).prop_map(|(pool_id, tenant)| rp::ListHeldRequest { pool_id, tenant }),
        ),
        "GetAllocationView" | "ListAllocationHistory" => encoded(
            text().prop_map(|allocation_id| vpb::GetAllocationViewRequest { allocation_id }),
        ),
        "ListAllocationViews" => encoded(
            (
                text(),
                prop::collection::vec(int32(), 0..10),
                int32(),
                text(),
                text(),
            )
                .prop_map(|(tenant, states, page_size, page_token, label_selector)| {
                    vpb::ListAllocationViewsRequest {
                        tenant,
                        states,
                        page_size,
                        page_token,
                        label_selector,
                    }
                }),
        ),
        "WatchAllocations" => encoded((text(), text()).prop_map(|(tenant, allocation_id)| {
            vpb::WatchAllocationsRequest {
                tenant,
                allocation_id,
                resume_versions: Default::default(),
            }
        })),
        "GetUsageReport" => encoded((text(), text(), int32()).prop_map(
            |(tenant, month, format)| vpb::GetUsageReportRequest {
                tenant,
                month,
                format,
                ..Default::default()
            },
        )),
        other => panic!("the fuzzer has no request for {other}: add one"),
    }
}

fn service_of(path: &str) -> Svc {
    if path.starts_with("/gpualloc.allocation.") {
        Svc::Allocation
    } else if path.starts_with("/gpualloc.resourcepool.") {
        Svc::ResourcePool
    } else {
        Svc::Viewer
    }
}

async fn stored(mesh: &Mesh) -> (i64, i64, i64) {
    (
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        count(&mesh.pool_db, "SELECT COUNT(*) AS n FROM pools").await,
        count(&mesh.pool_db, "SELECT COUNT(*) AS n FROM tenant_quotas").await,
    )
}

/// Every service SERVING, I1 audited, and (once the backlog drained) I4:
/// the viewer equals the allocation service, state and version.
async fn invariants_hold(mesh: &Mesh) {
    for s in [&mesh.allocation, &mesh.pool, &mesh.viewer] {
        s.wait_serving().await;
    }
    all_drained(mesh).await;
    assert_eq!(audit_i1(&mesh.pool_db.url).await, 0, "I1 is broken");
    let truth = "SELECT allocation_id AS id, state, version FROM allocations ORDER BY 1";
    let views = "SELECT allocation_id AS id, state, version FROM allocation_views ORDER BY 1";
    eventually(
        Duration::from_secs(30),
        "the viewer equals the allocation service",
        || async {
            let a = rows(&mesh.allocation_db.url, truth).await;
            let v = rows(&mesh.viewer_db.url, views).await;
            (a == v).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_clear_statuses_and_change_nothing_they_should_not() {
    let mesh = Mesh::start(Backend::Postgres).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team-a", gpus(8, "")).await;
    let real = create(&mesh, "team-a", gpus(1, "A100")).await;
    wait_state(&mesh, "team-a", &real.allocation_id, apb::State::Allocated).await;

    let admin = auth::admin_token();
    let tenant = auth::tenant_token("team-a");
    let mut runner = runner();
    let mut calls = 0;
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for path in raw::public_methods() {
        let strategy = request(&path);
        for case in 0..cases() {
            let body = strategy.new_tree(&mut runner).unwrap().current();
            let token = if case % 3 == 0 { &tenant } else { &admin };
            let channel = match service_of(&path) {
                Svc::Allocation => mesh.allocation.channel(),
                Svc::ResourcePool => mesh.pool.channel(),
                Svc::Viewer => mesh.viewer.channel(),
            };
            let before = stored(&mesh).await;
            let code = raw::call(channel, &path, body.clone().into(), Some(token)).await;
            calls += 1;
            *by_code.entry(format!("{code:?}")).or_default() += 1;
            if matches!(code, Code::Unknown | Code::Internal | Code::DataLoss) {
                // The whole input, to replay: it may be megabytes.
                let file = std::env::temp_dir().join(format!(
                    "gpualloc-fuzz-{}.bin",
                    path.rsplit('/').next().unwrap_or("rpc")
                ));
                let _ = std::fs::write(&file, &body);
                panic!(
                    "{path} answered {code:?} to {} bytes (saved in {})",
                    body.len(),
                    file.display()
                );
            }
            if code != Code::Ok {
                assert_eq!(
                    stored(&mesh).await,
                    before,
                    "{path} refused with {code:?} but stored something"
                );
            }
        }
    }
    eprintln!("wire fuzz: {calls} calls, outcomes {by_code:?}");
    invariants_hold(&mesh).await;
}

/// A forged event: any payload, ids real or made up, tenants wrong,
/// versions extreme.
fn forged(real: Vec<(String, String)>) -> BoxedStrategy<(String, ev::Event)> {
    let payload = prop_oneof![
        resources().prop_map(
            |resources| Payload::AllocationRequested(ev::AllocationRequested {
                resources: resources.map(event_resources),
                priority: 0,
                lease: None,
                create_time: None,
                approved: true,
            })
        ),
        text().prop_map(|reason| Payload::AllocationCancelled(ev::AllocationCancelled { reason })),
        prop::option::of(timestamp()).prop_map(|expire_time| Payload::AllocationRenewalRequested(
            ev::AllocationRenewalRequested { expire_time }
        )),
        prop::option::of(timestamp()).prop_map(|expire_time| Payload::ReservationRenewed(
            ev::ReservationRenewed { expire_time }
        )),
        (int32(), int64(), text(), text()).prop_map(|(state, version, tenant, actor)| {
            Payload::AllocationStateChanged(ev::AllocationStateChanged {
                previous_state: 0,
                allocation: Some(ev::AllocationSnapshot {
                    state,
                    version,
                    tenant,
                    ..Default::default()
                }),
                actor,
            })
        }),
        (text(), text()).prop_map(|(pool_id, gpu_model)| Payload::ReservationGranted(
            ev::ReservationGranted {
                pool_id,
                gpu_model,
                expire_time: None,
            }
        )),
        (int64(), text()).prop_map(|(position, reason)| Payload::ReservationHeld(
            ev::ReservationHeld { position, reason }
        )),
        (text(), int32()).prop_map(|(reason, cause)| Payload::ReservationRejected(
            ev::ReservationRejected { reason, cause }
        )),
        (int32(), text()).prop_map(|(cause, pool_id)| Payload::ReservationReleased(
            ev::ReservationReleased {
                cause,
                reason: String::new(),
                pool_id,
            }
        )),
        resources().prop_map(
            |limits| Payload::TenantQuotaChanged(ev::TenantQuotaChanged {
                limits: limits.map(event_resources),
                approval_above: None,
            })
        ),
    ];
    let real_len = real.len();
    (
        payload,
        0..real_len + 2,
        prop_oneof![Just(1i64), Just(17), Just(i64::MAX), int64()],
        text(),
        any::<bool>(),
    )
        .prop_map(
            move |(payload, pick, version, other_tenant, right_subject)| {
                // A real allocation with the wrong tenant, or a made-up one;
                // a made-up allocation's own snapshot names another tenant
                // than its event (a self-consistent forgery is the bus
                // permissions' to stop, see bus.rs).
                let (id, tenant) = match real.get(pick) {
                    Some((id, _)) => (id.clone(), other_tenant),
                    None => (uuid::Uuid::now_v7().to_string(), "team-a".to_owned()),
                };
                let mut payload = payload;
                if let Payload::AllocationStateChanged(c) = &mut payload
                    && let Some(a) = &mut c.allocation
                {
                    a.allocation_id = id.clone();
                    if a.tenant == tenant {
                        a.tenant = format!("{tenant}-x");
                    }
                }
                let subject = if right_subject {
                    subjects::of(&payload).to_owned()
                } else {
                    subjects::RESERVATION_GRANTED.to_owned()
                };
                let event = ev::Event {
                    event_id: uuid::Uuid::now_v7().to_string(),
                    allocation_id: id,
                    tenant,
                    aggregate_version: version,
                    event_time: None,
                    payload: Some(payload),
                };
                (subject, event)
            },
        )
        .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_events_never_stick_and_never_change_what_they_contradict() {
    let mesh = Mesh::start(Backend::Postgres).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 2)])).await;
    set_quota(&mesh, "team-a", gpus(8, "")).await;
    let mut real = Vec::new();
    for _ in 0..3 {
        let a = create(&mesh, "team-a", gpus(1, "A100")).await;
        real.push((a.allocation_id, "team-a".to_owned()));
    }
    all_drained(&mesh).await;
    let mut runner = runner();
    let strategy = forged(real.clone());
    let n = cases() * 8;
    for _ in 0..n {
        let (subject, event) = strategy.new_tree(&mut runner).unwrap().current();
        // Contradicting what is stored: a real allocation under another
        // tenant, or one that does not exist. (A forgery that agrees with
        // everything is the bus permissions' to stop: see bus.rs.)
        if real
            .iter()
            .any(|(id, t)| *id == event.allocation_id && *t == event.tenant)
        {
            continue;
        }
        match publish_as(&mesh, gpualloc_nats_acl::OPERATOR, &subject, &event).await {
            Ok(()) => {}
            // Larger than the server takes: it never reaches a consumer.
            Err(e) if e.contains("max payload") => {}
            Err(e) => panic!("publishing a forged event: {e}"),
        }
    }
    // Real work still flows: every real allocation reaches a steady state.
    for (id, t) in &real {
        eventually(Duration::from_secs(30), "a steady state", || async {
            let s = get(&mesh, t, id).await.state;
            (s == apb::State::Allocated as i32 || s == apb::State::Held as i32).then_some(())
        })
        .await;
    }
    eprintln!("event fuzz: {n} forged events");
    invariants_hold(&mesh).await;
}
