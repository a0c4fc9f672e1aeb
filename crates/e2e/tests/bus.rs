//! The event bus is authenticated and what travels on it is checked, on a
//! real nats-server with the accounts configuration of `gpualloc-nats-acl`:
//! anonymous clients are refused, a service's user may publish only its
//! own events and may not delete the stream; and what an allowed publisher
//! forges — a payload on another subject, another tenant's allocation, a
//! huge version — is set aside as poison, never applied, without holding
//! up the events behind it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, fixtures::*};
use gpualloc_proto::{allocation::v1 as apb, events::v1 as ev};
use gpualloc_saga::{Payload, subjects};
use gpualloc_testkit::{eventually, nats_connect_as};

/// Whether JetStream took `event` from `user`.
async fn accepted(mesh: &Mesh, user: &str, subject: &str, event: &ev::Event) -> bool {
    gpualloc_e2e::fixtures::publish_as(mesh, user, subject, event)
        .await
        .is_ok()
}

fn event(id: &str, tenant: &str, version: i64, payload: Payload) -> ev::Event {
    ev::Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        allocation_id: id.into(),
        tenant: tenant.into(),
        aggregate_version: version,
        event_time: None,
        payload: Some(payload),
    }
}

fn granted() -> Payload {
    Payload::ReservationGranted(ev::ReservationGranted {
        pool_id: "p".into(),
        gpu_model: "A100".into(),
        expire_time: None,
    })
}

async fn stream_messages(mesh: &Mesh) -> u64 {
    stream_info(mesh).await.state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_may_publish_only_its_own_events() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 1)])).await;
    set_quota(&mesh, "team-a", gpus(4, "")).await;
    // Capacity for one: the second is held, and a forged grant would
    // allocate it without capacity.
    let first = create(&mesh, "team-a", gpus(1, "A100")).await;
    wait_state(&mesh, "team-a", &first.allocation_id, apb::State::Allocated).await;
    let held = create(&mesh, "team-a", gpus(1, "A100")).await;
    wait_state(&mesh, "team-a", &held.allocation_id, apb::State::Held).await;
    all_drained(&mesh).await;
    let before = stream_messages(&mesh).await;

    let forged = event(&held.allocation_id, "team-a", 9, granted());
    for user in ["allocation", "viewer"] {
        assert!(
            !accepted(&mesh, user, subjects::RESERVATION_GRANTED, &forged).await,
            "{user} published a ReservationGranted"
        );
    }
    let cancel = event(
        &first.allocation_id,
        "team-a",
        9,
        Payload::AllocationCancelled(ev::AllocationCancelled {
            reason: "forged".into(),
        }),
    );
    for user in ["resource-pool", "viewer"] {
        assert!(
            !accepted(&mesh, user, subjects::ALLOCATION_CANCELLED, &cancel).await,
            "{user} published an AllocationCancelled"
        );
    }
    assert_eq!(
        stream_messages(&mesh).await,
        before,
        "nothing forged reached the stream"
    );
    // No service may delete or purge the stream.
    for user in ["allocation", "resource-pool", "viewer"] {
        let js = async_nats::jetstream::new(nats_connect_as(&mesh.nats_url, user).await.unwrap());
        let deleted =
            tokio::time::timeout(Duration::from_secs(2), js.delete_stream(&mesh.stream)).await;
        assert!(!matches!(deleted, Ok(Ok(_))), "{user} deleted the stream");
    }
    // The stream is still there, with what it held.
    assert_eq!(stream_messages(&mesh).await, before);
    // Anonymous clients are not let in at all.
    assert!(async_nats::connect(mesh.nats_url.as_str()).await.is_err());
    assert_eq!(
        get(&mesh, "team-a", &held.allocation_id).await.state,
        apb::State::Held as i32
    );
    assert_eq!(
        get(&mesh, "team-a", &first.allocation_id).await.state,
        apb::State::Allocated as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_events_are_poison_and_hold_up_nothing() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 1)])).await;
    set_quota(&mesh, "team-a", gpus(4, "")).await;
    set_quota(&mesh, "team-b", gpus(4, "")).await;
    let a = create(&mesh, "team-a", gpus(1, "A100")).await;
    wait_state(&mesh, "team-a", &a.allocation_id, apb::State::Allocated).await;
    let held = create(&mesh, "team-b", gpus(1, "A100")).await;
    wait_state(&mesh, "team-b", &held.allocation_id, apb::State::Held).await;
    all_drained(&mesh).await;

    // As the pool's own user (the worst case: its credentials leaked).
    let pool = "resource-pool";
    // 1. A grant for team-b's held allocation that names team-a.
    let wrong_tenant = event(&held.allocation_id, "team-a", 2, granted());
    // 2. A grant with a version that would make every real decision stale.
    let huge = event(&held.allocation_id, "team-b", i64::MAX / 2, granted());
    // 3. A quota change smuggled onto the subject of a pool change.
    let smuggled = ev::Event {
        payload: Some(Payload::TenantQuotaChanged(ev::TenantQuotaChanged {
            limits: Some(ev::Resources {
                gpus: 1000,
                ..Default::default()
            }),
            approval_above: None,
        })),
        ..event("", "team-b", 99, granted())
    };
    assert!(accepted(&mesh, pool, subjects::RESERVATION_GRANTED, &wrong_tenant).await);
    assert!(accepted(&mesh, pool, subjects::RESERVATION_GRANTED, &huge).await);
    assert!(accepted(&mesh, pool, subjects::POOL_CHANGED, &smuggled).await);
    // Every consumer acknowledges them (nothing is redelivered forever).
    all_drained(&mesh).await;
    let b = get(&mesh, "team-b", &held.allocation_id).await;
    assert_eq!(
        b.state,
        apb::State::Held as i32,
        "a forged grant was applied"
    );

    // Real work goes on: cancelling a's grant admits b, whose real grant
    // (version 2) is not stale behind the forged huge version.
    cancel(&mesh, "team-a", &a.allocation_id).await.unwrap();
    wait_state(&mesh, "team-b", &held.allocation_id, apb::State::Allocated).await;
    let summary = mesh
        .viewer()
        .get_tenant_summary(gpualloc_e2e::tenant(
            "team-b",
            gpualloc_proto::viewer::v1::GetTenantSummaryRequest {
                tenant: "team-b".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        summary.quota.unwrap().gpus,
        4,
        "the smuggled quota change reached the viewer"
    );
    let poisoned = eventually(Duration::from_secs(10), "poison counted", || async {
        let text = gpualloc_telemetry::METRICS.render();
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("gpualloc_events_poison_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (n >= 3.0).then_some(n)
    })
    .await;
    // The allocation service: the tenant and the version; the viewer: the
    // subject.
    assert!(poisoned >= 3.0, "{poisoned}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_logs_in_with_an_nkey_seed() {
    use gpualloc_nats_acl::{SERVICES, Secret, User};
    let key = nkeys::KeyPair::new_user();
    let server = gpualloc_testkit::NatsServer::start_with_users(vec![User::service(
        &SERVICES[0],
        Secret::Nkey(key.public_key()),
        "nk",
        "NK",
    )]);
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("allocation.nk");
    std::fs::write(&seed_file, key.seed().unwrap()).unwrap();
    let mut config = gpualloc_saga::BusConfig::new(server.url());
    config.stream = "NK".into();
    config.prefix = "nk".into();
    config.auth.nkey_seed_file = Some(seed_file.clone());
    let bus = gpualloc_saga::Bus::connect(config.clone(), "allocation", |_| {})
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), bus.provision())
        .await
        .expect("provisioning timed out")
        .unwrap();
    let ack = bus
        .js
        .publish("nk.saga.allocation.requested", "x".into())
        .await
        .unwrap();
    ack.await.unwrap();
    // Another seed is not that user.
    let stranger = nkeys::KeyPair::new_user();
    std::fs::write(&seed_file, stranger.seed().unwrap()).unwrap();
    let bus = gpualloc_saga::Bus::connect(config, "allocation", |_| {})
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(3), bus.provision()).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a stranger's seed was let in"
    );
}

/// NATS's decentralised mode, made here: an operator, an account with
/// JetStream, and a user of it with the allocation service's permissions,
/// as signed JWTs; the user's JWT and seed go into a `.creds` file.
mod operator_mode {
    use base64::Engine as _;

    fn encode(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// A JWT with `claims`, issued and signed by `issuer`.
    pub fn jwt(
        issuer: &nkeys::KeyPair,
        subject: &str,
        name: &str,
        nats: serde_json::Value,
    ) -> String {
        let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
        let claims = serde_json::json!({
            "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
            "iat": gpualloc_auth::now_unix(),
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let signing_input = format!("{}.{}", encode(&header), encode(&claims));
        let signature = issuer.sign(signing_input.as_bytes()).unwrap();
        format!(
            "{signing_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
        )
    }

    pub fn creds(user_jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_logs_in_with_a_creds_file() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // JetStream needs a system account in this mode.
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = operator_mode::jwt(
        &operator,
        &operator.public_key(),
        "gpualloc-op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let acc_jwt = operator_mode::jwt(
        &operator,
        &account.public_key(),
        "GPUALLOC",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let sys_jwt = operator_mode::jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let perms = gpualloc_nats_acl::permissions(&gpualloc_nats_acl::SERVICES[0], "cr", "CR");
    let user_jwt = operator_mode::jwt(
        &account,
        &user.public_key(),
        "allocation",
        serde_json::json!({
            "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1,
            "pub": {"allow": perms.publish}, "sub": {"allow": perms.subscribe},
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = gpualloc_testkit::free_port();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "host: \"127.0.0.1\"\nport: {port}\njetstream {{ store_dir: \"{}\" }}\n\
             operator: \"{op_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {acc}: \"{acc_jwt}\", {sys}: \"{sys_jwt}\" }}\n",
            dir.path().join("js").display(),
            acc = account.public_key(),
            sys = system.public_key(),
        ),
    )
    .unwrap();
    let mut server = std::process::Command::new(
        std::env::var("GPUALLOC_NATS_SERVER").unwrap_or_else(|_| "nats-server".into()),
    )
    .arg("-c")
    .arg(&conf)
    .arg("-l")
    .arg(dir.path().join("nats.log"))
    .spawn()
    .unwrap();
    let creds = dir.path().join("allocation.creds");
    std::fs::write(
        &creds,
        operator_mode::creds(&user_jwt, &user.seed().unwrap()),
    )
    .unwrap();
    let mut config = gpualloc_saga::BusConfig::new(format!("nats://127.0.0.1:{port}"));
    config.stream = "CR".into();
    config.prefix = "cr".into();
    config.auth.creds_file = Some(creds);
    let result = async {
        let bus = gpualloc_saga::Bus::connect(config, "allocation", |_| {}).await?;
        tokio::time::timeout(Duration::from_secs(15), bus.provision()).await??;
        let ack = bus
            .js
            .publish("cr.saga.allocation.requested", "x".into())
            .await?;
        ack.await?;
        // The user's JWT carries the service's permissions.
        let forged = bus
            .js
            .publish("cr.saga.reservation.granted", "x".into())
            .await?;
        let refused = tokio::time::timeout(Duration::from_secs(2), forged).await;
        anyhow::ensure!(!matches!(refused, Ok(Ok(_))), "a forged grant was accepted");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result.unwrap();
}
