//! State-machine property test of the allocation core
//! (`gpualloc_allocation::machine`).
//!
//! Random sequences of what tenants, administrators and the resource pool
//! do to one allocation — cancels, approvals, rejections, renewals, pool
//! decisions at stale, current, next and skipped versions, the same
//! decision delivered again, and time passing — run through the pure
//! transitions. A reference model, written as its own table of what each
//! action does in each state, predicts every outcome; after each step the
//! allocation must agree with it and:
//! - every announced state change is a move the state machine allows, and
//!   only an ALLOCATED allocation is changed without moving (a renewal);
//! - each change is one new version, announced once with its snapshot, the
//!   last snapshot being the allocation as stored;
//! - the pool is asked to place exactly when the allocation becomes
//!   PENDING, to release exactly when it becomes CANCELLING, and to renew
//!   only for the caller's renewal;
//! - a decision at a version already applied changes nothing, and the
//!   pool version never goes back; a terminal allocation never changes.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use gpualloc_allocation::machine::{
    Allocation, Fact, NewAllocation, PoolDecision, Refusal, Release, Step,
};
use gpualloc_domain::{AllocationId, Class, GpuModel, PoolId, Resources, State, TenantId};
use proptest::prelude::*;

const SEC: i64 = 1_000_000;
const T0: i64 = 1_800_000_000 * SEC;

#[derive(Clone, Debug)]
enum Kind {
    NeedsApproval,
    Granted { lease_secs: Option<i64> },
    Held,
    Rejected,
    Released { expired: bool },
    Renewed { secs: i64 },
    Other,
}

#[derive(Clone, Debug)]
enum Action {
    Cancel,
    Approve,
    Reject,
    Renew(i64),
    /// A pool decision at the allocation's pool version plus `offset`
    /// (≤ 0 stale, 1 next, 2 one skipped: a late delivery).
    Pool {
        kind: Kind,
        offset: i64,
    },
    /// The last pool decision delivered again.
    Redeliver,
    Tick(i64),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        1 => Just(Kind::NeedsApproval),
        3 => prop::option::of(1..100i64).prop_map(|lease_secs| Kind::Granted { lease_secs }),
        2 => Just(Kind::Held),
        1 => Just(Kind::Rejected),
        2 => any::<bool>().prop_map(|expired| Kind::Released { expired }),
        2 => (1..200i64).prop_map(|secs| Kind::Renewed { secs }),
        1 => Just(Kind::Other),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => Just(Action::Cancel),
        1 => Just(Action::Approve),
        1 => Just(Action::Reject),
        2 => (1..200i64).prop_map(Action::Renew),
        8 => (kind(), -1..=2i64).prop_map(|(kind, offset)| Action::Pool { kind, offset }),
        2 => Just(Action::Redeliver),
        1 => (1..50i64).prop_map(Action::Tick),
    ]
}

fn decision(kind: &Kind, now: i64) -> PoolDecision {
    let pool = PoolId::parse("p0").unwrap();
    match kind {
        Kind::NeedsApproval => PoolDecision::NeedsApproval {
            reason: "above the threshold".into(),
        },
        Kind::Granted { lease_secs } => PoolDecision::Granted {
            pool,
            gpu_model: Some(GpuModel::parse("A100").unwrap()),
            expire_time: lease_secs.map(|s| now + s * SEC),
        },
        Kind::Held => PoolDecision::Held {
            reason: "no room".into(),
        },
        Kind::Rejected => PoolDecision::Rejected {
            reason: "never fits".into(),
        },
        Kind::Released { expired } => PoolDecision::Released {
            cause: if *expired {
                Release::Expired
            } else {
                Release::Ended
            },
            pool: Some(pool),
            reason: String::new(),
        },
        Kind::Renewed { secs } => PoolDecision::Renewed {
            expire_time: Some(now + secs * SEC),
        },
        Kind::Other => PoolDecision::Other,
    }
}

/// What the model expects the pool to be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ask {
    Placement,
    Release,
    Renewal(i64),
}

/// The reference model: only what an observer of the allocation can see.
#[derive(Clone, Debug)]
struct Model {
    state: State,
    version: i64,
    pool_version: i64,
    approved: bool,
    rejected_by_admin: bool,
    pool: Option<&'static str>,
    model: Option<&'static str>,
    expire: Option<i64>,
}

/// The model's prediction for one action.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Refused(Refusal),
    /// The states passed through (one per new version) and the asks.
    Moves(Vec<State>, Vec<Ask>),
}

impl Model {
    fn step(&mut self, action: &Action, v: i64, d: Option<&PoolDecision>, now: i64) -> Expect {
        use State::*;
        let same = Expect::Moves(vec![], vec![]);
        let refuse = |state, action| Expect::Refused(Refusal::WrongState { state, action });
        match action {
            Action::Cancel => match self.state {
                Cancelling | Cancelled => same,
                AwaitingApproval => self.go(&[Cancelled], vec![]),
                Pending | Held | Allocated => self.go(&[Cancelling], vec![Ask::Release]),
                s => refuse(s, "cancel"),
            },
            Action::Approve => match self.state {
                AwaitingApproval => {
                    self.approved = true;
                    self.go(&[Pending], vec![Ask::Placement])
                }
                _ if self.approved => same,
                s => refuse(s, "approve"),
            },
            Action::Reject => match self.state {
                AwaitingApproval => {
                    self.rejected_by_admin = true;
                    self.go(&[Rejected], vec![])
                }
                Rejected if self.rejected_by_admin => same,
                s => refuse(s, "reject"),
            },
            Action::Renew(secs) => match (self.state, self.expire) {
                (Allocated, Some(end)) if now + secs * SEC > end => {
                    self.go(&[Allocated], vec![Ask::Renewal(now + secs * SEC)])
                }
                (Allocated, Some(_)) => same,
                (Allocated, None) => Expect::Refused(Refusal::NoLease),
                (s, _) => refuse(s, "renew"),
            },
            Action::Tick(_) => same,
            Action::Pool { .. } | Action::Redeliver => {
                let Some(d) = d else { return same };
                if let PoolDecision::NeedsApproval { .. } = d {
                    return if self.state == Pending && !self.approved {
                        self.go(&[AwaitingApproval], vec![])
                    } else {
                        same
                    };
                }
                if v <= self.pool_version {
                    return same;
                }
                self.pool_version = v;
                match (d, self.state) {
                    (PoolDecision::Granted { expire_time, .. }, Pending | Held) => {
                        self.pool = Some("p0");
                        self.model = Some("A100");
                        self.expire = *expire_time;
                        self.go(&[Allocated], vec![])
                    }
                    (PoolDecision::Held { .. }, Pending) => self.go(&[Held], vec![]),
                    (PoolDecision::Rejected { .. }, Pending | Held | Cancelling) => {
                        self.go(&[Rejected], vec![])
                    }
                    (
                        PoolDecision::Released {
                            cause: Release::Expired,
                            ..
                        },
                        Pending | Held,
                    ) => {
                        self.pool = Some("p0");
                        self.expire = Some(now);
                        self.go(&[Allocated, Expired], vec![])
                    }
                    (
                        PoolDecision::Released {
                            cause: Release::Expired,
                            ..
                        },
                        Allocated | Cancelling,
                    ) => self.go(&[Expired], vec![]),
                    (PoolDecision::Released { .. }, Cancelling) => self.go(&[Cancelled], vec![]),
                    (
                        PoolDecision::Renewed {
                            expire_time: Some(end),
                        },
                        Allocated,
                    ) if self.expire < Some(*end) => {
                        self.expire = Some(*end);
                        self.go(&[Allocated], vec![])
                    }
                    _ => same,
                }
            }
        }
    }

    fn go(&mut self, states: &[State], asks: Vec<Ask>) -> Expect {
        self.version += states.len() as i64;
        if let Some(last) = states.last() {
            self.state = *last;
        }
        Expect::Moves(states.to_vec(), asks)
    }
}

fn start(awaiting: bool, lease: bool) -> (Allocation, Model) {
    let new = NewAllocation {
        tenant: TenantId::parse("t0").unwrap(),
        resources: Resources::from_lines([(&Class::Gpus, 1)]),
        request_id: None,
        priority: 0,
        lease: lease.then_some(60 * SEC),
        labels: BTreeMap::new(),
        display_name: String::new(),
    };
    let (next, facts) = Allocation::create(AllocationId::new(), &new, awaiting, T0);
    let state = if awaiting {
        State::AwaitingApproval
    } else {
        State::Pending
    };
    assert_eq!(next.state, state);
    let asks: Vec<_> = facts
        .iter()
        .filter(|f| !matches!(f, Fact::Changed { .. }))
        .collect();
    assert_eq!(
        asks.len(),
        usize::from(!awaiting),
        "placement asked iff PENDING"
    );
    let model = Model {
        state,
        version: 1,
        pool_version: 0,
        approved: false,
        rejected_by_admin: false,
        pool: None,
        model: None,
        expire: None,
    };
    (next, model)
}

/// The checks every step must pass, whatever the model says.
fn check_step(from: &Allocation, next: &Allocation, facts: &[Fact]) -> (Vec<State>, Vec<Ask>) {
    let mut states = Vec::new();
    let mut asks = Vec::new();
    let mut version = from.version;
    let mut state = from.state;
    for fact in facts {
        match fact {
            Fact::Changed {
                snapshot, previous, ..
            } => {
                version += 1;
                assert_eq!(snapshot.version, version, "one version per change");
                assert_eq!(*previous, Some(state), "announced from where it was");
                if snapshot.state == state {
                    assert_eq!(state, State::Allocated, "only a lease changes in place");
                } else {
                    assert!(
                        state.can_move_to(snapshot.state),
                        "{state} -> {}",
                        snapshot.state
                    );
                }
                state = snapshot.state;
                states.push(state);
            }
            Fact::PlacementRequested => asks.push(Ask::Placement),
            Fact::ReleaseRequested => asks.push(Ask::Release),
            Fact::RenewalRequested { end } => asks.push(Ask::Renewal(*end)),
        }
    }
    if let Some(Fact::Changed { snapshot, .. }) =
        facts.iter().rfind(|f| matches!(f, Fact::Changed { .. }))
    {
        assert_eq!(**snapshot, *next, "the last snapshot is what is stored");
    }
    assert_eq!(next.version, version);
    assert!(
        next.pool_version >= from.pool_version,
        "pool version went back"
    );
    if from.state.is_terminal() {
        assert_eq!(next.state, from.state, "a terminal allocation moved");
    }
    if asks.contains(&Ask::Placement) {
        assert_eq!(next.state, State::Pending);
    }
    if asks.contains(&Ask::Release) {
        assert_eq!(next.state, State::Cancelling);
    }
    (states, asks)
}

fn run(awaiting: bool, lease: bool, actions: &[Action]) {
    let (mut a, mut model) = start(awaiting, lease);
    let mut now = T0;
    let mut last: Option<(PoolDecision, i64)> = None;
    for action in actions {
        let (d, v) = match action {
            Action::Pool { kind, offset } => {
                let d = decision(kind, now);
                let v = (a.pool_version + offset).max(1);
                last = Some((d.clone(), v));
                (Some(d), v)
            }
            Action::Redeliver => match &last {
                Some((d, v)) => (Some(d.clone()), *v),
                None => (None, 0),
            },
            _ => (None, 0),
        };
        let expect = model.step(action, v, d.as_ref(), now);
        let outcome = match action {
            Action::Cancel => a.cancel("t0", "", now),
            Action::Approve => a.approve("admin", now),
            Action::Reject => a.reject(
                "admin",
                "",
                a.state == State::Rejected && model.rejected_by_admin,
                now,
            ),
            Action::Renew(secs) => a.renew("t0", secs * SEC, now),
            Action::Pool { .. } | Action::Redeliver => Ok(match &d {
                Some(d) => a.apply(d, v, now),
                None => Step::Same,
            }),
            Action::Tick(secs) => {
                now += secs * SEC;
                Ok(Step::Same)
            }
        };
        let got = match outcome {
            Err(r) => Expect::Refused(r),
            Ok(Step::Same) => Expect::Moves(vec![], vec![]),
            Ok(Step::Next { next, facts }) => {
                let (states, asks) = check_step(&a, &next, &facts);
                a = next;
                Expect::Moves(states, asks)
            }
        };
        assert_eq!(got, expect, "after {action:?}");
        assert_eq!(a.state, model.state);
        assert_eq!(a.version, model.version);
        assert_eq!(a.approved_time.is_some(), model.approved);
        assert_eq!(a.pool.as_ref().map(|p| p.as_str()), model.pool);
        assert_eq!(a.expire_time, model.expire);
        assert_eq!(a.resources.gpu_model().map(|m| m.as_str()), model.model);
        assert_eq!(a.pool_version, model.pool_version);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_allocation_core_follows_the_model(
        awaiting in any::<bool>(),
        lease in any::<bool>(),
        actions in prop::collection::vec(action(), 1..40),
    ) {
        run(awaiting, lease, &actions);
    }
}

/// The cases the issue that introduced the core names, spelled out.
#[test]
fn an_expiry_that_overtakes_its_grant_records_both() {
    run(
        false,
        true,
        &[
            Action::Pool {
                kind: Kind::Held,
                offset: 1,
            },
            Action::Pool {
                kind: Kind::Released { expired: true },
                offset: 2,
            },
            Action::Pool {
                kind: Kind::Granted {
                    lease_secs: Some(10),
                },
                offset: -1,
            },
        ],
    );
}
