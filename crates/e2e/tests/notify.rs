//! Notifications as a receiver sees them: the exact requests of each
//! channel (webhook with HMAC signature, Slack, KakaoTalk), every state a
//! tenant cares about plus the lease warning, tenant and kind filters;
//! delivery exactly once across a receiver outage and two dispatching
//! replicas; parking of what a receiver refuses, and requeueing it.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use gpualloc_e2e::{Backend, Mesh, Service, Svc, Tuning, admin, fixtures::*};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    resourcepool::v1 as rp,
};
use gpualloc_testkit::{HttpReceiver, Received, eventually};
use gpualloc_viewer::notifications::delivery as dispatch;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const DEADLINE: Duration = Duration::from_secs(60);

fn settings_file(dir: &tempfile::TempDir, json: serde_json::Value) -> PathBuf {
    let path = dir.path().join("notify.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

async fn mesh_with(backend: Backend, notify: PathBuf) -> Mesh {
    let tuning = Tuning {
        notify_config: Some(notify),
        ..Tuning::default()
    };
    Mesh::start_tuned(backend, tuning).await
}

fn json(r: &Received) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// Decodes `application/x-www-form-urlencoded`.
fn form(body: &str) -> BTreeMap<String, String> {
    fn unescape(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (unescape(k), unescape(v)))
        .collect()
}

/// Waits until the receiver got `n` requests on `path`.
async fn received_on(r: &HttpReceiver, path: &str, n: usize) -> Vec<Received> {
    eventually(DEADLINE, &format!("{n} requests on {path}"), || async {
        let got: Vec<_> = r
            .received()
            .into_iter()
            .filter(|x| x.path == path)
            .collect();
        (got.len() >= n).then_some(got)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_channel_gets_every_state_change_in_its_own_shape() {
    let receiver = HttpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "webhook-secret";
    let path = settings_file(
        &dir,
        serde_json::json!({
            "lease_warning_seconds": 4,
            "channels": [
                {"name": "hook", "type": "webhook", "tenant": "team",
                 "url": receiver.url("/hook"), "secret": secret},
                {"name": "ops", "type": "slack", "url": receiver.url("/slack")},
                {"name": "me", "type": "kakao", "tenant": "team",
                 "base_url": receiver.url(""), "token": "kakao-token",
                 "link_url": "https://console.example/allocations"},
                // Kind filter: only grants of one tenant.
                {"name": "grants", "type": "webhook", "tenant": "team",
                 "kinds": ["ALLOCATED"], "url": receiver.url("/grants")}
            ]
        }),
    );
    let mesh = mesh_with(Backend::Sqlite, path).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    mesh.pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: "team".into(),
            limits: Some(gpus(16, "")),
            approval_above: Some(gpus(3, "")),
            max_hold: None,
            update_mask: None,
        }))
        .await
        .unwrap();
    set_quota(&mesh, "other", gpus(8, "")).await;
    let t = "team";
    let request = |n: i32, lease: Option<i64>| apb::CreateAllocationRequest {
        tenant: t.into(),
        resources: Some(gpus(n, "A100")),
        lease: lease.map(seconds),
        ..Default::default()
    };

    // a: ALLOCATED, then CANCELLED; b: HELD at position 1, ALLOCATED when
    // a is gone, then CANCELLED; c: REJECTED by an administrator;
    // d: ALLOCATED with a short lease, warned, EXPIRED.
    let a = create_request(&mesh, t, request(3, None)).await;
    wait_view(&mesh, t, &a.allocation_id, State::Allocated).await;
    let b = create_request(&mesh, t, request(2, None)).await;
    wait_view(&mesh, t, &b.allocation_id, State::Held).await;
    let c = create_request(&mesh, t, request(4, None)).await;
    mesh.allocations()
        .reject_allocation(admin(apb::RejectAllocationRequest {
            allocation_id: c.allocation_id.clone(),
            reason: "use the shared queue".into(),
        }))
        .await
        .unwrap();
    cancel(&mesh, t, &a.allocation_id).await.unwrap();
    wait_view(&mesh, t, &b.allocation_id, State::Allocated).await;
    let d = create_request(&mesh, t, request(1, Some(6))).await;
    wait_view(&mesh, t, &d.allocation_id, State::Allocated).await;
    wait_view(&mesh, t, &d.allocation_id, State::Expired).await;
    cancel(&mesh, t, &b.allocation_id).await.unwrap();
    wait_view(&mesh, t, &b.allocation_id, State::Cancelled).await;
    let o = create(&mesh, "other", gpus(1, "A100")).await;
    wait_view(&mesh, "other", &o.allocation_id, State::Allocated).await;

    let expected: BTreeSet<(String, String)> = [
        (&a, "ALLOCATED"),
        (&a, "CANCELLED"),
        (&b, "HELD"),
        (&b, "ALLOCATED"),
        (&b, "CANCELLED"),
        (&c, "REJECTED"),
        (&d, "ALLOCATED"),
        (&d, "LEASE_EXPIRING"),
        (&d, "EXPIRED"),
    ]
    .into_iter()
    .map(|(x, k)| (x.allocation_id.clone(), k.to_owned()))
    .collect();

    // The webhook: the notification as JSON, signed over
    // "{timestamp}.{body}".
    let hooks = received_on(&receiver, "/hook", expected.len()).await;
    let mut got = BTreeSet::new();
    for r in &hooks {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = json(r);
        let kind = body["kind"].as_str().unwrap().to_owned();
        assert_eq!(body["tenant"], "team");
        assert_eq!(r.header("x-gpualloc-event"), Some(kind.as_str()));
        assert_eq!(r.header("x-gpualloc-delivery"), body["id"].as_str());
        let ts = r.header("x-gpualloc-timestamp").unwrap();
        let age = gpualloc_domain::time::now_micros() / 1_000_000 - ts.parse::<i64>().unwrap();
        assert!((0..120).contains(&age), "timestamp {ts}");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&r.body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            r.header("x-gpualloc-signature"),
            Some(format!("sha256={hex}").as_str())
        );
        let id = body["allocation_id"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "HELD" => assert_eq!(body["hold_position"], 1, "{body}"),
            "REJECTED" => assert_eq!(body["reason"], "use the shared queue"),
            "ALLOCATED" => assert_eq!(body["pool"], "p"),
            "LEASE_EXPIRING" | "EXPIRED" => {
                assert!(
                    body["expire_time"].as_str().unwrap().ends_with('Z'),
                    "{body}"
                )
            }
            _ => {}
        }
        assert!(body["text"].as_str().unwrap().contains(&id));
        assert!(got.insert((id, kind.clone())), "{kind} twice: {body}");
    }
    assert_eq!(got, expected);

    // Slack: every tenant (no tenant filter), `{"text": …}` only.
    let slack = received_on(&receiver, "/slack", expected.len() + 1).await;
    for r in &slack {
        let body = json(r);
        let object = body.as_object().unwrap();
        assert_eq!(object.keys().collect::<Vec<_>>(), ["text"], "{body}");
        assert!(body["text"].as_str().unwrap().starts_with("[gpualloc]"));
    }
    assert!(
        slack
            .iter()
            .any(|r| json(r)["text"].as_str().unwrap().contains(&o.allocation_id)),
        "the global channel missed another tenant"
    );

    // KakaoTalk: the memo API with a bearer token and a text template.
    let kakao = received_on(&receiver, "/v2/api/talk/memo/default/send", expected.len()).await;
    for r in &kakao {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("authorization"), Some("Bearer kakao-token"));
        assert_eq!(
            r.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        let fields = form(&r.text());
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["template_object"]);
        let template: serde_json::Value = serde_json::from_str(&fields["template_object"]).unwrap();
        assert_eq!(template["object_type"], "text");
        let text = template["text"].as_str().unwrap();
        assert!(text.starts_with("[gpualloc] team") && text.chars().count() <= 200);
        assert_eq!(
            template["link"]["web_url"],
            "https://console.example/allocations"
        );
        assert_eq!(
            template["link"]["mobile_web_url"],
            "https://console.example/allocations"
        );
    }

    // The kind filter: three grants, nothing else.
    let grants = received_on(&receiver, "/grants", 3).await;
    assert!(grants.iter().all(|r| json(r)["kind"] == "ALLOCATED"));

    // Nothing more arrives: each notification once per channel (all
    // deliveries are recorded as delivered, none pending).
    let viewer_db = open_db(&mesh.viewer_db).await;
    eventually(DEADLINE, "all delivered", || async {
        let pending = dispatch::list(&viewer_db, Some("PENDING".into()), 1000)
            .await
            .unwrap();
        pending.is_empty().then_some(())
    })
    .await;
    let delivered = dispatch::list(&viewer_db, Some("DELIVERED".into()), 1000)
        .await
        .unwrap();
    let per_path = |p: &str| receiver.received().iter().filter(|r| r.path == p).count();
    assert_eq!(per_path("/hook"), expected.len());
    assert_eq!(per_path("/slack"), expected.len() + 1);
    assert_eq!(per_path("/v2/api/talk/memo/default/send"), expected.len());
    assert_eq!(per_path("/grants"), 3);
    assert_eq!(delivered.len(), 3 * expected.len() + 1 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_was_down_gets_each_notification_exactly_once() {
    let mut receiver = HttpReceiver::start().await;
    receiver.down().await;
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        &dir,
        serde_json::json!({
            "retry_base_ms": 100,
            "retry_max_ms": 800,
            "max_attempts": 1000,
            "channels": [{"name": "hook", "type": "webhook", "url": receiver.url("/hook")}]
        }),
    );
    let mesh = mesh_with(Backend::Postgres, path.clone()).await;
    // A second replica dispatches from the same database.
    let second = Service::spawn_tuned(
        Svc::Viewer,
        mesh.viewer.common.clone(),
        String::new(),
        None,
        Tuning {
            notify_config: Some(path),
            ..Tuning::default()
        },
    )
    .await;
    second.wait_serving().await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team", gpus(8, "")).await;

    // While the receiver is down the sagas and views move on.
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create(&mesh, "team", gpus(1, "A100")).await.allocation_id);
    }
    for id in &ids[..3] {
        wait_view(&mesh, "team", id, State::Allocated).await;
        cancel(&mesh, "team", id).await.unwrap();
    }
    for id in &ids[..3] {
        wait_view(&mesh, "team", id, State::Cancelled).await;
    }
    let viewer_db = open_db(&mesh.viewer_db).await;
    // Retried: attempts grow, the error is recorded.
    let pending = eventually(DEADLINE, "failed attempts", || async {
        let rows = dispatch::list(&viewer_db, Some("PENDING".into()), 100)
            .await
            .unwrap();
        (rows.len() == 9 && rows.iter().all(|r| r.attempts >= 2)).then_some(rows)
    })
    .await;
    assert!(
        pending
            .iter()
            .all(|r| r.last_error.contains("request failed")),
        "{:?}",
        pending.iter().map(|r| &r.last_error).collect::<Vec<_>>()
    );

    // Then it answers 503 for a while, then it is well again.
    receiver.respond_with(503);
    receiver.up().await;
    eventually(DEADLINE, "503s recorded", || async {
        let rows = dispatch::list(&viewer_db, Some("PENDING".into()), 100)
            .await
            .unwrap();
        rows.iter()
            .any(|r| r.last_error.contains("503"))
            .then_some(())
    })
    .await;
    receiver.respond_with(200);
    eventually(DEADLINE, "everything delivered", || async {
        let rows = dispatch::list(&viewer_db, Some("DELIVERED".into()), 100)
            .await
            .unwrap();
        (rows.len() == 9).then_some(())
    })
    .await;
    // Exactly once: each notification was accepted (answered 200) by the
    // receiver once, whichever replica sent it; the other requests are the
    // 503s before.
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused = 0;
    for r in receiver.received() {
        assert_eq!(r.path, "/hook");
        if r.status == 200 {
            *accepted
                .entry(r.header("x-gpualloc-delivery").unwrap().to_owned())
                .or_default() += 1;
        } else {
            refused += 1;
        }
    }
    assert!(refused > 0, "no request saw the 503s");
    assert_eq!(accepted.len(), 9, "{accepted:?}");
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    let delivered = dispatch::list(&viewer_db, Some("DELIVERED".into()), 100)
        .await
        .unwrap();
    let keys: BTreeSet<_> = delivered.iter().map(|d| d.dedupe_key.clone()).collect();
    assert_eq!(keys, accepted.keys().cloned().collect());
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_the_receiver_refuses_is_parked_and_can_be_requeued() {
    let receiver = HttpReceiver::start().await;
    receiver.respond_with(404);
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        &dir,
        serde_json::json!({
            "retry_base_ms": 50,
            "retry_max_ms": 100,
            "max_attempts": 3,
            "channels": [
                {"name": "gone", "type": "slack", "url": receiver.url("/gone")},
                {"name": "flaky", "type": "slack", "url": receiver.url("/flaky")}
            ]
        }),
    );
    let mesh = mesh_with(Backend::Sqlite, path).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team", gpus(8, "")).await;
    let a = create(&mesh, "team", gpus(1, "A100")).await;
    wait_view(&mesh, "team", &a.allocation_id, State::Allocated).await;

    let viewer_db = open_db(&mesh.viewer_db).await;
    let parked = eventually(DEADLINE, "parked", || async {
        let rows = dispatch::list(&viewer_db, Some("PARKED".into()), 100)
            .await
            .unwrap();
        (rows.len() == 2).then_some(rows)
    })
    .await;
    for row in &parked {
        // A 404 will not get better by retrying: parked at once. (Both
        // channels answer 404 here; the receiver answers per request.)
        assert_eq!(row.attempts, 1, "{row:?}");
        assert!(row.last_error.starts_with("HTTP 404"), "{row:?}");
        assert_eq!(row.allocation_id, a.allocation_id);
    }

    // 500s are retried, up to max_attempts.
    receiver.respond_with(500);
    assert_eq!(dispatch::requeue(&viewer_db).await.unwrap(), 2);
    let gave_up = eventually(DEADLINE, "parked after 3 attempts", || async {
        let rows = dispatch::list(&viewer_db, Some("PARKED".into()), 100)
            .await
            .unwrap();
        (rows.len() == 2 && rows.iter().all(|r| r.attempts == 3)).then_some(rows)
    })
    .await;
    assert!(gave_up[0].last_error.contains("gave up after 3 attempts"));

    // Fixed: requeued, delivered once each.
    receiver.respond_with(200);
    let before = receiver.received().len();
    dispatch::requeue(&viewer_db).await.unwrap();
    eventually(DEADLINE, "delivered after requeue", || async {
        let rows = dispatch::list(&viewer_db, Some("DELIVERED".into()), 100)
            .await
            .unwrap();
        (rows.len() == 2).then_some(())
    })
    .await;
    assert_eq!(receiver.received().len(), before + 2);
    // 2 refused at once, 2 × 3 retried, 2 delivered.
    assert_eq!(receiver.received().len(), 2 + 6 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirects_are_not_followed() {
    let elsewhere = HttpReceiver::start().await;
    let receiver = HttpReceiver::start().await;
    receiver.redirect_to(307, elsewhere.url("/collect"));
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        &dir,
        serde_json::json!({
            "channels": [
                {"name": "hook", "type": "webhook", "url": receiver.url("/hook"), "secret": "s3cret"}
            ]
        }),
    );
    let mesh = mesh_with(Backend::Sqlite, path).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, "team", gpus(8, "")).await;
    let a = create(&mesh, "team", gpus(1, "A100")).await;
    wait_view(&mesh, "team", &a.allocation_id, State::Allocated).await;
    let viewer_db = open_db(&mesh.viewer_db).await;
    let parked = eventually(DEADLINE, "parked", || async {
        let rows = dispatch::list(&viewer_db, Some("PARKED".into()), 100)
            .await
            .unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert!(
        parked[0].last_error.contains("redirects"),
        "{:?}",
        parked[0]
    );
    assert!(!receiver.received().is_empty());
    assert!(
        elsewhere.received().is_empty(),
        "the signed body was sent where the receiver pointed"
    );
}
