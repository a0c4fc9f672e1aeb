//! The allocation state machine as pure rules: an [`Allocation`] and the
//! transitions that a tenant, an administrator or the resource pool can
//! make it take. Each transition returns a [`Step`] — the next allocation
//! and the [`Fact`]s to announce — or a typed [`Refusal`]. Nothing here
//! reads a clock, a database or a wire message: `ops` loads, stores and
//! emits; `handler` turns the pool's events into [`PoolDecision`]s;
//! `wire` turns allocations into messages. `tests/machine_model.rs` checks
//! these rules against a reference model.
//!
//! Only the moves [`State::can_move_to`] allows are ever made; a decision
//! that does not fit the current state, and one already applied, change
//! nothing. That alone makes duplicate, late and re-ordered pool decisions
//! harmless.

use std::collections::BTreeMap;

use gpualloc_domain::{AllocationId, Caller, GpuModel, PoolId, Resources, State, TenantId, time};
use serde::Serialize;

/// A validated CreateAllocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewAllocation {
    pub tenant: TenantId,
    pub resources: Resources,
    pub request_id: Option<String>,
    pub priority: i32,
    pub lease: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// Left out of the fingerprint when empty, so that requests made
    /// before names existed still match their replays.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub display_name: String,
}

impl NewAllocation {
    /// Canonical form of the parameters, compared when a request_id is
    /// reused.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One allocation: what was asked, where the saga stands, and the
/// bookkeeping that orders its changes. Times are microseconds since the
/// epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub id: AllocationId,
    pub tenant: TenantId,
    pub state: State,
    /// Why it is in its state, for people.
    pub reason: String,
    pub resources: Resources,
    /// The pool it was granted on.
    pub pool: Option<PoolId>,
    pub priority: i32,
    pub request_id: Option<String>,
    /// [`NewAllocation::fingerprint`] of the request that created it.
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub lease: Option<i64>,
    /// Bumped by every change that is announced.
    pub version: i64,
    /// The last reservation version of the pool's decisions applied.
    pub pool_version: i64,
    pub approved_time: Option<i64>,
    pub create_time: i64,
    pub update_time: i64,
    pub expire_time: Option<i64>,
    /// Re-drives of the current saga step so far, and when the next is due.
    pub redrives: i32,
    pub redrive_time: Option<i64>,
    pub display_name: String,
}

/// What a change announces. Every fact but `Changed` is about the
/// allocation the step ends with ([`Step::Next`]'s `next`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// The allocation as it became (a new version), whether its state moved
    /// or not; `actor` is the person who caused it, empty for the saga.
    Changed {
        snapshot: Box<Allocation>,
        previous: Option<State>,
        actor: String,
    },
    /// The pool is asked to place it.
    PlacementRequested,
    /// The pool is asked to release whatever it reserved for it.
    ReleaseRequested,
    /// The pool is asked to end its lease at `end` instead.
    RenewalRequested { end: i64 },
}

/// The outcome of a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // returned once per transition, never kept
pub enum Step {
    /// Nothing to write or announce (a replay, a decision already applied).
    Same,
    /// Store `next` in place of the allocation the step started from and
    /// announce `facts` (none when only the pool version was recorded).
    Next { next: Allocation, facts: Vec<Fact> },
}

/// Why a person's request cannot be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    WrongState {
        state: State,
        action: &'static str,
    },
    /// A renewal of an allocation that has no lease.
    NoLease,
}

/// How the pool ended a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Its lease ran out.
    Expired,
    /// Cancelled, or any other cause.
    Ended,
}

/// One decision of the resource pool about an allocation's reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolDecision {
    /// Admitting it needs an administrator (outside the version order).
    NeedsApproval {
        reason: String,
    },
    Granted {
        pool: PoolId,
        /// The model the pool chose, when any was acceptable.
        gpu_model: Option<GpuModel>,
        expire_time: Option<i64>,
    },
    Held {
        reason: String,
    },
    Rejected {
        reason: String,
    },
    Released {
        cause: Release,
        pool: Option<PoolId>,
        reason: String,
    },
    Renewed {
        expire_time: Option<i64>,
    },
    /// A reservation event the allocation does not act on; its version is
    /// still recorded, so the order of the ones after it holds.
    Other,
}

impl PoolDecision {
    /// Whether the decision takes a place in the reservation's version
    /// order (and so may have to wait for the versions before it).
    pub fn is_ordered(&self) -> bool {
        !matches!(self, PoolDecision::NeedsApproval { .. })
    }
}

impl Allocation {
    /// A new allocation: PENDING, asking the pool, or AWAITING_APPROVAL,
    /// waiting for an administrator; with the facts that announce it.
    pub fn create(
        id: AllocationId,
        new: &NewAllocation,
        awaiting_approval: bool,
        now: i64,
    ) -> (Allocation, Vec<Fact>) {
        let (state, reason) = if awaiting_approval {
            (
                State::AwaitingApproval,
                "above the tenant's approval threshold; waiting for an administrator",
            )
        } else {
            (State::Pending, "waiting for the resource pool's decision")
        };
        let next = Allocation {
            id,
            tenant: new.tenant.clone(),
            state,
            reason: reason.to_owned(),
            resources: new.resources.clone(),
            pool: None,
            priority: new.priority,
            request_id: new.request_id.clone(),
            fingerprint: new.fingerprint(),
            labels: new.labels.clone(),
            lease: new.lease,
            version: 1,
            pool_version: 0,
            approved_time: None,
            create_time: now,
            update_time: now,
            expire_time: None,
            redrives: 0,
            redrive_time: None,
            display_name: new.display_name.clone(),
        };
        let mut facts = vec![Fact::Changed {
            snapshot: Box::new(next.clone()),
            previous: None,
            actor: String::new(),
        }];
        if state == State::Pending {
            facts.push(Fact::PlacementRequested);
        }
        (next, facts)
    }

    /// Whether `caller` may see and act on it; to everyone else it does
    /// not exist.
    pub fn visible_to(&self, caller: &Caller) -> bool {
        caller.may_access(&self.tenant)
    }

    pub fn cancel(&self, actor: &str, reason: &str, now: i64) -> Result<Step, Refusal> {
        let reason = if reason.is_empty() {
            "cancelled by the tenant"
        } else {
            reason
        };
        match self.state {
            State::Cancelling | State::Cancelled => Ok(Step::Same),
            // Nothing was asked of the pool yet.
            State::AwaitingApproval => Ok(Changes::new(self)
                .moved(State::Cancelled, reason, actor, now, |_| {})
                .done()),
            State::Pending | State::Held | State::Allocated => Ok(Changes::new(self)
                .moved(State::Cancelling, reason, actor, now, |_| {})
                .also(Fact::ReleaseRequested)
                .done()),
            state @ (State::Rejected | State::Expired) => Err(Refusal::WrongState {
                state,
                action: "cancel",
            }),
        }
    }

    /// An administrator's approval: PENDING, and the pool is asked. A
    /// second approval changes nothing.
    pub fn approve(&self, actor: &str, now: i64) -> Result<Step, Refusal> {
        match self.state {
            State::AwaitingApproval => Ok(Changes::new(self)
                .moved(
                    State::Pending,
                    "approved; waiting for the resource pool's decision",
                    actor,
                    now,
                    |a| a.approved_time = Some(now),
                )
                .also(Fact::PlacementRequested)
                .done()),
            _ if self.approved_time.is_some() => Ok(Step::Same),
            state => Err(Refusal::WrongState {
                state,
                action: "approve",
            }),
        }
    }

    /// An administrator's rejection. `rejected_before` says whether an
    /// administrator already rejected it (then a second rejection changes
    /// nothing; a rejection by the pool is not one).
    pub fn reject(
        &self,
        actor: &str,
        reason: &str,
        rejected_before: bool,
        now: i64,
    ) -> Result<Step, Refusal> {
        let reason = if reason.is_empty() {
            "rejected by an administrator"
        } else {
            reason
        };
        match self.state {
            State::AwaitingApproval => Ok(Changes::new(self)
                .moved(State::Rejected, reason, actor, now, |_| {})
                .done()),
            State::Rejected if rejected_before => Ok(Step::Same),
            state => Err(Refusal::WrongState {
                state,
                action: "reject",
            }),
        }
    }

    /// Asks the pool to end the lease of an ALLOCATED allocation `lease`
    /// from now. The request (who asked, to when) is recorded at once; the
    /// expiry moves when the pool confirms ([`PoolDecision::Renewed`]). A
    /// renewal that would not move the end later changes nothing.
    pub fn renew(&self, actor: &str, lease: i64, now: i64) -> Result<Step, Refusal> {
        if self.state != State::Allocated {
            return Err(Refusal::WrongState {
                state: self.state,
                action: "renew",
            });
        }
        let Some(current) = self.expire_time else {
            return Err(Refusal::NoLease);
        };
        let end = now.saturating_add(lease);
        if end <= current {
            return Ok(Step::Same);
        }
        let reason = format!("lease renewal requested: to end at {}", time::rfc3339(end));
        Ok(Changes::new(self)
            .amended(&reason, actor, now, |_| {})
            .also(Fact::RenewalRequested { end })
            .done())
    }

    /// Applies one decision of the pool, `version` in its reservation's
    /// order. Stale decisions (a version already applied) and decisions
    /// that do not fit the state change nothing but the recorded version.
    /// Waiting for versions that have not arrived is the caller's
    /// business (it knows about deliveries).
    pub fn apply(&self, decision: &PoolDecision, version: i64, now: i64) -> Step {
        use PoolDecision as D;
        use State::*;
        if let D::NeedsApproval { reason } = decision {
            return if self.state == Pending && self.approved_time.is_none() {
                Changes::new(self)
                    .moved(AwaitingApproval, reason, "", now, |_| {})
                    .done()
            } else {
                Step::Same
            };
        }
        if version <= self.pool_version {
            return Step::Same;
        }
        let changes = Changes::new(self);
        match (decision, self.state) {
            (
                D::Released {
                    cause: Release::Expired,
                    pool,
                    reason,
                },
                Pending | Held,
            ) => {
                // The grant and the end of its lease overtook each other
                // (two replicas of the consumer, or a lost grant): it was
                // granted and has expired. Both steps are recorded, so the
                // history shows the grant; the late grant is then stale.
                let on = pool.as_ref().map_or("", PoolId::as_str);
                let reason = if reason.is_empty() {
                    "lease expired"
                } else {
                    reason
                };
                changes
                    .moved(
                        Allocated,
                        &format!("granted on pool {on} (learned when its lease ended)"),
                        "",
                        now,
                        |a| {
                            a.pool_version = version;
                            a.pool = pool.clone();
                            a.expire_time = Some(now);
                        },
                    )
                    .moved(Expired, reason, "", now, |_| {})
                    .done()
            }
            (
                D::Renewed {
                    expire_time: Some(end),
                },
                Allocated,
            ) if self.expire_time < Some(*end) => {
                let reason = format!("lease renewed: it ends at {}", time::rfc3339(*end));
                changes
                    .amended(&reason, "", now, |a| {
                        a.pool_version = version;
                        a.expire_time = Some(*end);
                    })
                    .done()
            }
            (
                D::Granted {
                    pool,
                    gpu_model,
                    expire_time,
                },
                Pending | Held,
            ) => changes
                .moved(
                    Allocated,
                    &format!("granted on pool {pool}"),
                    "",
                    now,
                    |a| {
                        a.pool_version = version;
                        a.pool = Some(pool.clone());
                        a.expire_time = *expire_time;
                        a.resources.fill_model(gpu_model.clone());
                    },
                )
                .done(),
            (D::Held { reason }, Pending) => changes
                .moved(Held, reason, "", now, |a| a.pool_version = version)
                .done(),
            (D::Rejected { reason }, Pending | Held | Cancelling) => changes
                .moved(Rejected, reason, "", now, |a| a.pool_version = version)
                .done(),
            // A release the allocation did not ask for (it is not
            // CANCELLING) can only be the end of the lease.
            (
                D::Released {
                    cause: cause @ Release::Expired,
                    reason,
                    ..
                },
                Allocated,
            )
            | (D::Released { cause, reason, .. }, Cancelling) => {
                let to = match cause {
                    Release::Expired => Expired,
                    Release::Ended => Cancelled,
                };
                let reason = if reason.is_empty() {
                    to.as_str().to_lowercase()
                } else {
                    reason.clone()
                };
                changes
                    .moved(to, &reason, "", now, |a| a.pool_version = version)
                    .done()
            }
            // Not applicable in this state: the version is remembered so
            // that an even older decision cannot apply later.
            _ => changes.seen(version).done(),
        }
    }

    /// What the reconciler asks the pool again for a saga stuck waiting on
    /// it: placement for PENDING, release for CANCELLING.
    pub fn redrive(&self) -> Option<Fact> {
        match self.state {
            State::Pending => Some(Fact::PlacementRequested),
            State::Cancelling => Some(Fact::ReleaseRequested),
            _ => None,
        }
    }

    /// Terminal states never change again: their last update is the end.
    pub fn end_time(&self) -> Option<i64> {
        self.state.is_terminal().then_some(self.update_time)
    }
}

/// Builds a [`Step::Next`] from one allocation: each change is a new
/// version, announced with its snapshot. (A step that changes nothing is
/// [`Step::Same`], decided before one of these is made.)
struct Changes {
    next: Allocation,
    facts: Vec<Fact>,
}

impl Changes {
    fn new(from: &Allocation) -> Self {
        Changes {
            next: from.clone(),
            facts: Vec::new(),
        }
    }

    /// Moves to `to`; only moves the state machine allows are made (the
    /// callers above choose them by the current state).
    fn moved(
        self,
        to: State,
        reason: &str,
        actor: &str,
        now: i64,
        edit: impl FnOnce(&mut Allocation),
    ) -> Self {
        debug_assert!(
            self.next.state.can_move_to(to),
            "{} -> {to}",
            self.next.state
        );
        self.change(Some(to), reason, actor, now, edit)
    }

    /// A change that keeps the state (a lease renewal).
    fn amended(
        self,
        reason: &str,
        actor: &str,
        now: i64,
        edit: impl FnOnce(&mut Allocation),
    ) -> Self {
        self.change(None, reason, actor, now, edit)
    }

    fn change(
        mut self,
        to: Option<State>,
        reason: &str,
        actor: &str,
        now: i64,
        edit: impl FnOnce(&mut Allocation),
    ) -> Self {
        let previous = self.next.state;
        let next = &mut self.next;
        if let Some(to) = to {
            next.state = to;
        }
        reason.clone_into(&mut next.reason);
        next.version += 1;
        next.update_time = now;
        // A new step of the saga starts with a fresh re-drive budget.
        next.redrives = 0;
        next.redrive_time = None;
        edit(next);
        self.facts.push(Fact::Changed {
            snapshot: Box::new(self.next.clone()),
            previous: Some(previous),
            actor: actor.to_owned(),
        });
        self
    }

    /// Records a decision's version without announcing anything.
    fn seen(mut self, version: i64) -> Self {
        self.next.pool_version = version;
        self
    }

    fn also(mut self, fact: Fact) -> Self {
        self.facts.push(fact);
        self
    }

    fn done(self) -> Step {
        Step::Next {
            next: self.next,
            facts: self.facts,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_unnamed_request_keeps_the_fingerprint_it_had_before_names() {
        let mut new = NewAllocation {
            tenant: TenantId::parse("t").unwrap(),
            resources: Resources::default(),
            request_id: Some("r".into()),
            priority: 0,
            lease: None,
            labels: BTreeMap::new(),
            display_name: String::new(),
        };
        // What rows stored before display names existed hold.
        let before = r#"{"tenant":"t","resources":{"cpu_millis":0,"memory_mib":0,"gpus":0,"gpu_model":null,"storage_gib":0,"custom":{}},"request_id":"r","priority":0,"lease":null,"labels":{}}"#;
        assert_eq!(new.fingerprint(), before);
        new.display_name = "run".into();
        assert_ne!(new.fingerprint(), before, "a name is a parameter");
    }
}
