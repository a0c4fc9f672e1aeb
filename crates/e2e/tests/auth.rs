//! Callers are who their verified token says, and nothing else: every
//! refusal is UNAUTHENTICATED with the reason, headers cannot make anyone
//! an administrator, keys rotate without a restart, the caller's token
//! travels on CheckQuota and the pool's refusal is the caller's, and mesh
//! mode trusts only single identity headers. All against the real
//! services over gRPC.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gpualloc_auth::{DEFAULT_AUDIENCE, DEV_ISSUER, DevIssuer, now_unix};
use gpualloc_e2e::{
    Backend, Mesh, Service, Svc, admin, bearer, common_config, fixtures::*, tenant,
};
use gpualloc_platform::AuthMode;
use gpualloc_proto::{
    allocation::v1 as apb, resourcepool::v1 as rp,
    resourcepool::v1::resource_pool_service_client::ResourcePoolServiceClient,
};
use gpualloc_testkit::{HttpReceiver, TestDb, auth::issuer, unique_name};
use jsonwebtoken::{Algorithm, Header};
use tonic::{Code, Request, metadata::MetadataValue};
use tonic_health::pb::health_check_response::ServingStatus;

fn claims(tenant: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": DEV_ISSUER, "aud": DEFAULT_AUDIENCE, "sub": "mallory",
        "exp": now_unix() + 600, "tenant": tenant,
    })
}

fn with_header<T>(mut r: Request<T>, name: &'static str, value: &'static str) -> Request<T> {
    r.metadata_mut()
        .insert(name, MetadataValue::from_static(value));
    r
}

fn create_request(t: &str) -> apb::CreateAllocationRequest {
    apb::CreateAllocationRequest {
        tenant: t.into(),
        resources: Some(gpus(1, "A100")),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_refusal_is_unauthenticated_and_says_why() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "team-a", gpus(4, "")).await;
    let i = issuer();
    let forged = DevIssuer::generate().unwrap();
    let mut same_kid = Header::new(Algorithm::ES256);
    same_kid.kid = Some(i.kid().to_owned());
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("team-a");
        f(&mut c);
        i.sign(&c).unwrap()
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "no bearer token"),
        (
            "a forged signature",
            Some(
                forged
                    .sign_with_header(&same_kid, &claims("team-a"))
                    .unwrap(),
            ),
            "signature does not verify",
        ),
        (
            "an unknown key",
            Some(forged.sign(&claims("team-a")).unwrap()),
            "not in the trusted key set",
        ),
        (
            "another issuer",
            Some(edit(&|c| c["iss"] = "https://evil.example".into())),
            "issuer",
        ),
        (
            "another audience",
            Some(edit(&|c| c["aud"] = "someone-else".into())),
            "audience",
        ),
        (
            "an expired token",
            Some(edit(&|c| c["exp"] = (now_unix() - 3600).into())),
            "expired",
        ),
        (
            "a token not valid yet",
            Some(edit(&|c| c["nbf"] = (now_unix() + 3600).into())),
            "not valid yet",
        ),
        (
            "no identity in the token",
            Some(edit(&|c| {
                c.as_object_mut().unwrap().remove("tenant");
            })),
            "neither a tenant",
        ),
        (
            "an HS256 token",
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &claims("team-a"),
                    &jsonwebtoken::EncodingKey::from_secret(b"guess").unwrap(),
                )
                .unwrap(),
            ),
            "only RS256 and ES256",
        ),
        ("garbage", Some("abc".into()), "not a well-formed JWT"),
    ];
    for (what, token, says) in cases {
        let request = match &token {
            Some(t) => bearer(t, create_request("team-a")),
            None => Request::new(create_request("team-a")),
        };
        let e = mesh
            .allocations()
            .create_allocation(request)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(
            e.message().contains(says),
            "{what}: {:?} should say {says:?}",
            e.message()
        );
        // The viewer and the pool refuse the same way.
        let request = match &token {
            Some(t) => bearer(t, rp::ListPoolsRequest::default()),
            None => Request::new(rp::ListPoolsRequest::default()),
        };
        let e = mesh.pools().list_pools(request).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what} at the pool");
    }
    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        0,
        "nothing was stored for a refused caller"
    );
    // The same request with a valid token is accepted.
    mesh.allocations()
        .create_allocation(tenant("team-a", create_request("team-a")))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_headers_make_nobody_an_administrator() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "team-a", gpus(4, "")).await;
    // Without a token, the headers the mesh would set are not enough.
    let forged = with_header(
        with_header(
            Request::new(rp::ListPoolsRequest::default()),
            "x-gpualloc-roles",
            "admin",
        ),
        "x-gpualloc-tenant",
        "team-a",
    );
    let e = mesh.pools().list_pools(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // With a tenant's token, they are stripped: still a tenant.
    let quota = rp::SetTenantQuotaRequest {
        tenant: "team-a".into(),
        limits: Some(gpus(100, "")),
        ..Default::default()
    };
    let r = with_header(tenant("team-a", quota), "x-gpualloc-roles", "admin");
    let e = mesh.pools().set_tenant_quota(r).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // ... and cannot act for another tenant by naming it in a header.
    let r = with_header(
        tenant("team-a", create_request("team-b")),
        "x-gpualloc-tenant",
        "team-b",
    );
    let e = mesh.allocations().create_allocation(r).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let q = mesh
        .pools()
        .get_tenant_quota(admin(rp::GetTenantQuotaRequest {
            tenant: "team-a".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.limits.unwrap().gpus, 4, "the quota did not change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_need_no_token() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    for s in [&mesh.allocation, &mesh.pool, &mesh.viewer] {
        // `health()` sends no token.
        assert_eq!(s.health().await, Some(ServingStatus::Serving));
    }
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(mesh.viewer.channel());
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("no service list: {answer:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "gpualloc.viewer.v1.ViewerService")
    );
}

/// A resource pool alone, trusting the keys at `jwks`.
async fn pool_trusting(
    jwks: &str,
    configure: impl Fn(&mut gpualloc_platform::CommonConfig),
) -> (Service, TestDb) {
    let db = TestDb::sqlite();
    let mut c = common_config(&db.url, &gpualloc_testkit::nats_url())
        .with_stream(&unique_name("A").to_uppercase(), &unique_name("a"));
    c.auth.jwks = Some(jwks.to_owned());
    c.auth.jwks_min_refetch = Duration::ZERO;
    configure(&mut c);
    let svc = Service::spawn(Svc::ResourcePool, c, String::new(), None).await;
    svc.wait_serving().await;
    (svc, db)
}

async fn list_pools(svc: &Service, token: &str) -> Result<(), tonic::Status> {
    ResourcePoolServiceClient::new(svc.channel())
        .list_pools(bearer(token, rp::ListPoolsRequest::default()))
        .await
        .map(|_| ())
}

fn jwks_of(issuers: &[&DevIssuer]) -> String {
    serde_json::json!({ "keys": issuers.iter().map(|i| i.jwk()).collect::<Vec<_>>() }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_rotate_without_a_restart_and_a_broken_key_set_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let (old, new) = (
        DevIssuer::generate().unwrap(),
        DevIssuer::generate().unwrap(),
    );
    std::fs::write(&file, jwks_of(&[&old])).unwrap();
    let (svc, _db) = pool_trusting(file.to_str().unwrap(), |_| {}).await;
    let hour = Duration::from_secs(3600);
    let old_token = old.token("a", None, &["admin"], hour).unwrap();
    let new_token = new.token("b", None, &["admin"], hour).unwrap();
    list_pools(&svc, &old_token).await.unwrap();
    let e = list_pools(&svc, &new_token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The identity provider publishes the new key: the first token that
    // names it makes the service read the set again.
    std::fs::write(&file, jwks_of(&[&old, &new])).unwrap();
    list_pools(&svc, &new_token).await.unwrap();

    // A broken key set (a half-written file) does not lock anyone out: a
    // token with an unknown kid makes the service read it, the read fails,
    // and the last good set stays.
    std::fs::write(&file, "{ not json").unwrap();
    let stranger = DevIssuer::generate().unwrap();
    let e = list_pools(&svc, &stranger.token("c", None, &["admin"], hour).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    list_pools(&svc, &old_token).await.unwrap();
    list_pools(&svc, &new_token).await.unwrap();

    // The old key is retired: once the set is read again, its tokens are
    // refused, though they were verified (and cached) before.
    std::fs::write(&file, jwks_of(&[&new])).unwrap();
    let _ = list_pools(&svc, &stranger.token("d", None, &["admin"], hour).unwrap()).await;
    let e = list_pools(&svc, &old_token).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "a retired key still admits"
    );
    list_pools(&svc, &new_token).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_come_from_a_url_and_survive_its_outage() {
    let receiver = HttpReceiver::start().await;
    let i = DevIssuer::generate().unwrap();
    receiver.respond_body(i.jwks_json());
    let (svc, _db) = pool_trusting(&receiver.url("/.well-known/jwks.json"), |_| {}).await;
    let token = i
        .token("a", None, &["admin"], Duration::from_secs(3600))
        .unwrap();
    list_pools(&svc, &token).await.unwrap();
    // The IdP fails: the keys in hand keep working.
    receiver.respond_with(503);
    let other = DevIssuer::generate().unwrap();
    let _ = list_pools(
        &svc,
        &other
            .token("b", None, &["admin"], Duration::from_secs(60))
            .unwrap(),
    )
    .await;
    assert!(
        receiver.received().iter().any(|r| r.status == 503),
        "the unknown kid made the service ask again"
    );
    list_pools(&svc, &token).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_callers_token_travels_on_check_quota_and_its_refusal_fails_the_create() {
    let nats = gpualloc_testkit::nats_url();
    let (stream, prefix) = (unique_name("Q").to_uppercase(), unique_name("q"));
    let (pool_db, alloc_db) = (TestDb::sqlite(), TestDb::sqlite());
    // The pool trusts the same keys but wants another audience: it refuses
    // every token the allocation service accepts.
    let mut pc = common_config(&pool_db.url, &nats).with_stream(&stream, &prefix);
    let pool = Service::spawn(Svc::ResourcePool, pc.clone(), String::new(), None).await;
    pool.wait_serving().await;
    let ac = common_config(&alloc_db.url, &nats).with_stream(&stream, &prefix);
    let allocation = Service::spawn(Svc::Allocation, ac, pool.url(), None).await;
    allocation.wait_serving().await;
    let pools = ResourcePoolServiceClient::new(pool.channel());
    put_pool_at(pools.clone(), "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota_at(pools, "team-a", gpus(4, "")).await;
    let mut allocations =
        gpualloc_proto::allocation::v1::allocation_service_client::AllocationServiceClient::new(
            allocation.channel(),
        );
    // The token reaches the pool: the advisory check answers ALLOWED and
    // the create goes through (without the token the pool would refuse).
    allocations
        .create_allocation(tenant("team-a", create_request("team-a")))
        .await
        .unwrap();

    let mut pool = pool;
    pool.stop().await;
    pc.auth.jwt_audience = "another-service".into();
    let pool = Service::spawn(Svc::ResourcePool, pc, String::new(), Some(pool.addr)).await;
    pool.wait_serving().await;
    let e = allocations
        .create_allocation(tenant("team-a", create_request("team-a")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("resource pool refused"), "{e:?}");
    let stored =
        gpualloc_e2e::fixtures::count(&alloc_db, "SELECT COUNT(*) AS n FROM allocations").await;
    assert_eq!(stored, 1, "the refused create stored nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mesh_mode_trusts_single_identity_headers_only() {
    let db = TestDb::sqlite();
    let mut c = common_config(&db.url, &gpualloc_testkit::nats_url())
        .with_stream(&unique_name("M").to_uppercase(), &unique_name("m"));
    c.auth.auth_mode = AuthMode::Mesh;
    c.auth.jwks = None;
    let svc = Service::spawn(Svc::ResourcePool, c, String::new(), None).await;
    svc.wait_serving().await;
    let mut client = ResourcePoolServiceClient::new(svc.channel());
    let as_admin = with_header(
        Request::new(rp::ListPoolsRequest::default()),
        "x-gpualloc-roles",
        "admin",
    );
    client.list_pools(as_admin).await.unwrap();
    let quota = |r: Request<rp::SetTenantQuotaRequest>| {
        let mut c = client.clone();
        async move { c.set_tenant_quota(r).await }
    };
    let req = || rp::SetTenantQuotaRequest {
        tenant: "team-a".into(),
        limits: Some(gpus(1, "")),
        ..Default::default()
    };
    let e = quota(with_header(
        Request::new(req()),
        "x-gpualloc-tenant",
        "team-a",
    ))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A client's copy beside the proxy's: refused, whatever the order.
    let mut twice = Request::new(req());
    twice
        .metadata_mut()
        .append("x-gpualloc-roles", MetadataValue::from_static("tenant"));
    twice
        .metadata_mut()
        .append("x-gpualloc-roles", MetadataValue::from_static("admin"));
    let e = quota(twice).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("more than once"), "{e:?}");
    let e = quota(Request::new(req())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM tenant_quotas").await,
        0,
        "a refused caller stored a quota"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_without_keys_does_not_start() {
    let db = TestDb::sqlite();
    let mut c = common_config(&db.url, &gpualloc_testkit::nats_url());
    c.auth.jwks = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = gpualloc_resource_pool::run(
        gpualloc_resource_pool::Config::new(c),
        listener,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("GPUALLOC_JWKS"), "{e:#}");
}
