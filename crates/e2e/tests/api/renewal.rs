//! Renewing a lease: `RenewAllocation` on an ALLOCATED allocation asks the
//! pool (which owns lease ends) to move the end; the allocation, the
//! viewer, the history and the lease-expiry warning all follow the new end,
//! the tenant is told once that it was renewed, and bad renewals get clear
//! statuses and change nothing.

use std::time::Duration;

use gpualloc_domain::time;
use gpualloc_e2e::{Backend, Mesh, Tuning, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    viewer::v1 as vpb,
};
use gpualloc_testkit::{HttpReceiver, eventually};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

fn renew_request(id: &str, lease: Option<prost_types::Duration>) -> apb::RenewAllocationRequest {
    apb::RenewAllocationRequest {
        allocation_id: id.into(),
        lease,
    }
}

async fn renew(
    mesh: &Mesh,
    t: &str,
    id: &str,
    lease: Option<prost_types::Duration>,
) -> Result<apb::Allocation, tonic::Status> {
    mesh.allocations()
        .renew_allocation(tenant(t, renew_request(id, lease)))
        .await
        .map(|r| r.into_inner())
}

/// The webhook notifications of `kind` about `id`, as JSON.
fn hooks(r: &HttpReceiver, id: &str, kind: &str) -> Vec<serde_json::Value> {
    r.received()
        .iter()
        .filter(|x| x.path == "/hook")
        .map(|x| serde_json::from_slice::<serde_json::Value>(&x.body).unwrap())
        .filter(|b| b["allocation_id"] == id && b["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_lease_moves_its_end_everywhere_it_is_shown() {
    let receiver = HttpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("notify.json");
    std::fs::write(
        &settings,
        serde_json::json!({
            "lease_warning_seconds": 60,
            "channels": [{"name": "hook", "type": "webhook", "tenant": "t",
                          "url": receiver.url("/hook")}]
        })
        .to_string(),
    )
    .unwrap();
    let tuning = Tuning {
        notify_config: Some(settings),
        ..Tuning::default()
    };
    let mesh = Mesh::start_tuned(Backend::Sqlite, tuning).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "t", gpus(4, "")).await;
    set_quota(&mesh, "u", gpus(4, "")).await;

    let leased = |lease: Option<i64>| apb::CreateAllocationRequest {
        resources: Some(gpus(1, "A100")),
        lease: lease.map(seconds),
        ..Default::default()
    };
    let a = create_request(&mesh, "t", leased(Some(30))).await;
    let granted = wait_state(&mesh, "t", &a.allocation_id, State::Allocated).await;
    let first_end = time::from_timestamp(granted.expire_time.as_ref().unwrap());
    // Within the warning window at once: warned about the first end.
    let first = eventually(DEADLINE, "the first lease warning", || async {
        hooks(&receiver, &a.allocation_id, "LEASE_EXPIRING")
            .first()
            .cloned()
    })
    .await;
    assert_eq!(first["expire_time"], time::rfc3339(first_end));

    // Renew: the answer records the request (who, to when) at once.
    let asked_at = time::now_micros();
    let asked = renew(&mesh, "t", &a.allocation_id, Some(seconds(50)))
        .await
        .unwrap();
    let answered_at = time::now_micros();
    assert_eq!(asked.state, State::Allocated as i32);
    assert_eq!(asked.version, granted.version + 1);
    assert!(
        asked
            .reason
            .starts_with("lease renewal requested: to end at "),
        "{}",
        asked.reason
    );

    // The pool confirms: the allocation's end moves to 50 s after the
    // renewal, and it is still ALLOCATED after its first end.
    let renewed = eventually(DEADLINE, "the renewal confirmed", || async {
        let now = get(&mesh, "t", &a.allocation_id).await;
        (now.version > asked.version).then_some(now)
    })
    .await;
    let end = time::from_timestamp(renewed.expire_time.as_ref().unwrap());
    assert!(
        (asked_at + 50_000_000 - 1_000_000..=answered_at + 50_000_000).contains(&end),
        "renewed at {asked_at}..{answered_at}, ends {end}"
    );
    assert_eq!(renewed.state, State::Allocated as i32);
    assert_eq!(
        renewed.reason,
        format!("lease renewed: it ends at {}", time::rfc3339(end))
    );

    // The viewer shows the new end; its history names who renewed.
    let view = eventually(DEADLINE, "the viewer shows the new end", || async {
        let v = mesh
            .viewer()
            .get_allocation_view(tenant(
                "t",
                vpb::GetAllocationViewRequest {
                    allocation_id: a.allocation_id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        (v.allocation.as_ref()?.version == renewed.version).then_some(v)
    })
    .await;
    assert_eq!(view.allocation.unwrap().expire_time, renewed.expire_time);
    let history = mesh
        .viewer()
        .list_allocation_history(tenant(
            "t",
            vpb::ListAllocationHistoryRequest {
                allocation_id: a.allocation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let request = history
        .iter()
        .find(|e| e.reason.starts_with("lease renewal requested"))
        .unwrap_or_else(|| panic!("{history:?}"));
    assert_eq!(request.actor, "user@t");
    assert!(history.iter().any(|e| e.reason == renewed.reason));

    // Told once that it was renewed, never "allocated" again, and warned
    // again about the new end.
    let told = eventually(DEADLINE, "a LEASE_RENEWED notification", || async {
        hooks(&receiver, &a.allocation_id, "LEASE_RENEWED")
            .first()
            .cloned()
    })
    .await;
    assert_eq!(told["expire_time"], time::rfc3339(end));
    assert_eq!(told["state"], "ALLOCATED");
    let warned_again = eventually(DEADLINE, "a warning about the new end", || async {
        hooks(&receiver, &a.allocation_id, "LEASE_EXPIRING")
            .into_iter()
            .find(|b| b["expire_time"] == time::rfc3339(end).as_str())
    })
    .await;
    assert!(
        warned_again["text"]
            .as_str()
            .unwrap()
            .contains(&a.allocation_id)
    );
    assert_eq!(hooks(&receiver, &a.allocation_id, "ALLOCATED").len(), 1);
    assert_eq!(hooks(&receiver, &a.allocation_id, "LEASE_RENEWED").len(), 1);

    // A renewal that would not move the end later changes nothing.
    let same = renew(&mesh, "t", &a.allocation_id, Some(seconds(5)))
        .await
        .unwrap();
    assert_eq!(same.version, renewed.version);
    assert_eq!(same.expire_time, renewed.expire_time);

    // Bad renewals: clear statuses, nothing changed.
    let code_and_field = |r: Result<apb::Allocation, tonic::Status>| {
        let s = r.unwrap_err();
        let field = tonic_types::StatusExt::get_details_bad_request(&s)
            .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
            .unwrap_or_default();
        (s.code(), field)
    };
    assert_eq!(
        code_and_field(renew(&mesh, "t", &a.allocation_id, None).await),
        (Code::InvalidArgument, "lease".into())
    );
    assert_eq!(
        code_and_field(renew(&mesh, "t", &a.allocation_id, Some(seconds(0))).await),
        (Code::InvalidArgument, "lease".into())
    );
    assert_eq!(
        code_and_field(renew(&mesh, "t", &a.allocation_id, Some(seconds(367 * 86_400))).await),
        (Code::InvalidArgument, "lease".into())
    );
    assert_eq!(
        renew(&mesh, "u", &a.allocation_id, Some(seconds(600)))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "another tenant's allocation"
    );
    let plain = create_request(&mesh, "t", leased(None)).await;
    wait_state(&mesh, "t", &plain.allocation_id, State::Allocated).await;
    let reason_of = |s: tonic::Status| {
        let info = tonic_types::StatusExt::get_details_error_info(&s).unwrap();
        (s.code(), info.reason)
    };
    assert_eq!(
        reason_of(
            renew(&mesh, "t", &plain.allocation_id, Some(seconds(600)))
                .await
                .unwrap_err()
        ),
        (Code::FailedPrecondition, "NO_LEASE".into())
    );
    cancel(&mesh, "t", &plain.allocation_id).await.unwrap();
    assert_eq!(
        reason_of(
            renew(&mesh, "t", &plain.allocation_id, Some(seconds(600)))
                .await
                .unwrap_err()
        ),
        (Code::FailedPrecondition, "WRONG_STATE".into())
    );
    let after = get(&mesh, "t", &a.allocation_id).await;
    assert_eq!(after.version, renewed.version, "{after:?}");
}
