//! State-machine property test of the pool's reservation logic.
//!
//! Random sequences of requests, duplicate deliveries, cancels (also
//! cancels that overtake their request), clock ticks that end leases, and
//! capacity changes run against two tiny pools and two tenants through the
//! real operations on a real SQLite database. A reference model, written
//! independently of the engine, follows the decisions the pool announces
//! and checks each one when it is made; after every step the database must
//! agree with the model and:
//! - granted ≤ capacity per pool and class (the counters equal the sum of
//!   the grants);
//! - charged (held + granted) ≤ quota per tenant;
//! - no held request fits any pool (the queue is drained as far as it can
//!   be), and whenever held requests were admitted, no request still
//!   waiting was ahead of them in admission order and could have used the
//!   capacity they took.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
};

use gpualloc_domain::{Capacity, Class, GpuModel, PoolId, Resources, TenantId, time};
use gpualloc_proto::{events::v1 as ev, resourcepool::v1 as pb};
use gpualloc_resource_pool::{
    Error, MIGRATIONS,
    admin::{self, PoolSpec, QuotaSpec},
    mask::{PoolMask, QuotaMask},
    saga, store,
};
use gpualloc_saga::{Emitter, Event, Payload};
use gpualloc_storage::{Db, DbConnection, DbOptions};
use gpualloc_testkit::TestDb;
use proptest::prelude::*;

const SEC: i64 = 1_000_000;
const POOLS: [&str; 2] = ["p0", "p1"];
const TENANTS: [&str; 2] = ["t0", "t1"];
const MODELS: [&str; 2] = ["A100", "H100"];

#[derive(Clone, Debug)]
enum Action {
    Request {
        tenant: usize,
        gpus: i64,
        model: Option<usize>,
        cpus: i64,
        priority: i32,
        lease_secs: Option<i64>,
    },
    /// The same request delivered again.
    Duplicate(usize),
    Cancel(usize),
    /// A cancel that reaches the pool before its request (which follows).
    CancelFirst {
        tenant: usize,
        gpus: i64,
    },
    Tick(i64),
    Resize {
        pool: usize,
        class: usize,
        amount: i64,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0..2usize, 0..=3i64, prop::option::of(0..2usize), 0..=3i64, 0..=2i32,
              prop::option::weighted(0.3, 1..=3i64))
            .prop_map(|(tenant, gpus, model, cpus, priority, lease_secs)| Action::Request {
                tenant, gpus, model, cpus, priority, lease_secs,
            }),
        1 => any::<prop::sample::Index>().prop_map(|i| Action::Duplicate(i.index(1 << 16))),
        3 => any::<prop::sample::Index>().prop_map(|i| Action::Cancel(i.index(1 << 16))),
        1 => (0..2usize, 1..=2i64).prop_map(|(tenant, gpus)| Action::CancelFirst { tenant, gpus }),
        2 => (1..=2i64).prop_map(Action::Tick),
        2 => (0..2usize, 0..3usize, 0..=4i64).prop_map(|(pool, class, amount)| Action::Resize {
            pool, class, amount,
        }),
    ]
}

/// A GPU model (if any) and the pool-class amounts taken with it.
type Layout = (Option<String>, Vec<(Class, i64)>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum MState {
    Held,
    Granted {
        pool: String,
        lines: Vec<(Class, i64)>,
        expire: Option<i64>,
    },
    Ended,
}

#[derive(Clone, Debug)]
struct MRes {
    tenant: String,
    demand: Resources,
    priority: i32,
    request_time: i64,
    lease: Option<i64>,
    state: MState,
    /// The request event, for duplicate deliveries.
    request: Option<Event>,
}

/// The reference model: what is granted and held, from first principles.
struct Model {
    now: i64,
    capacity: BTreeMap<String, BTreeMap<Class, i64>>,
    limits: BTreeMap<String, BTreeMap<Class, i64>>,
    res: BTreeMap<String, MRes>,
    ids: Vec<String>,
}

fn gpu_class(m: &str) -> Class {
    Class::GpusOf(GpuModel::parse(m).unwrap())
}

impl Model {
    fn used(&self, pool: &str) -> BTreeMap<Class, i64> {
        let mut out = BTreeMap::new();
        for r in self.res.values() {
            if let MState::Granted { pool: p, lines, .. } = &r.state
                && p == pool
            {
                for (c, v) in lines {
                    *out.entry(c.clone()).or_insert(0) += v;
                }
            }
        }
        out
    }

    fn free(&self, pool: &str) -> BTreeMap<Class, i64> {
        let used = self.used(pool);
        let mut free = self.capacity[pool].clone();
        for (c, v) in used {
            *free.entry(c).or_insert(0) -= v;
        }
        free
    }

    fn charged(&self, tenant: &str, granted_only: bool) -> BTreeMap<Class, i64> {
        let mut out = BTreeMap::new();
        for r in self.res.values().filter(|r| r.tenant == tenant) {
            let counts = match r.state {
                MState::Held => !granted_only,
                MState::Granted { .. } => true,
                MState::Ended => false,
            };
            if counts {
                for (c, v) in r.demand.quota_lines() {
                    *out.entry(c).or_insert(0) += v;
                }
            }
        }
        out
    }

    fn within_quota(&self, tenant: &str, demand: &Resources) -> bool {
        let charged = self.charged(tenant, false);
        demand.quota_lines().iter().all(|(c, v)| {
            charged.get(c).copied().unwrap_or(0) + v
                <= self.limits[tenant].get(c).copied().unwrap_or(0)
        })
    }

    /// Every way `demand` can be laid out on `pool`, with the GPU model.
    fn layouts(&self, pool: &str, demand: &Resources) -> Vec<Layout> {
        if demand.gpus() == 0 {
            return vec![(None, demand.pool_lines(None))];
        }
        let models: Vec<String> = match demand.gpu_model() {
            Some(m) => vec![m.to_string()],
            None => self.capacity[pool]
                .keys()
                .filter_map(|c| match c {
                    Class::GpusOf(m) => Some(m.to_string()),
                    _ => None,
                })
                .collect(),
        };
        models
            .into_iter()
            .map(|m| {
                let lines = demand.pool_lines(Some(&GpuModel::parse(m.clone()).unwrap()));
                (Some(m), lines)
            })
            .collect()
    }

    fn fits(free: &BTreeMap<Class, i64>, lines: &[(Class, i64)]) -> bool {
        lines
            .iter()
            .all(|(c, v)| free.get(c).copied().unwrap_or(0) >= *v)
    }

    fn fits_now_anywhere(&self, demand: &Resources) -> bool {
        POOLS.iter().any(|p| {
            let free = self.free(p);
            self.layouts(p, demand)
                .iter()
                .any(|(_, l)| Self::fits(&free, l))
        })
    }

    fn ever_fits(&self, demand: &Resources) -> bool {
        POOLS.iter().any(|p| {
            self.layouts(p, demand)
                .iter()
                .any(|(_, l)| Self::fits(&self.capacity[*p], l))
        })
    }

    fn order(&self, a: &str, b: &str) -> Ordering {
        let (x, y) = (&self.res[a], &self.res[b]);
        y.priority
            .cmp(&x.priority)
            .then(x.request_time.cmp(&y.request_time))
            .then_with(|| a.cmp(b))
    }
}

struct Harness {
    /// Taken out in `drop`: closing connections needs the runtime.
    db: Option<Db>,
    rt: tokio::runtime::Runtime,
    _file: TestDb,
    model: Model,
    next: usize,
}

impl Harness {
    fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let file = TestDb::sqlite();
        let db = rt.block_on(async {
            let db = Db::connect(&file.url, DbOptions::default()).await.unwrap();
            db.migrate(&[gpualloc_storage::MIGRATIONS, MIGRATIONS])
                .await
                .unwrap();
            db
        });
        let mut capacity = BTreeMap::new();
        capacity.insert(
            "p0".to_owned(),
            BTreeMap::from([(Class::CpuMillis, 4_000), (gpu_class("A100"), 2)]),
        );
        capacity.insert(
            "p1".to_owned(),
            BTreeMap::from([
                (Class::CpuMillis, 6_000),
                (gpu_class("A100"), 1),
                (gpu_class("H100"), 2),
            ]),
        );
        let limits = BTreeMap::from([
            (
                "t0".to_owned(),
                BTreeMap::from([(Class::Gpus, 4), (Class::CpuMillis, 8_000)]),
            ),
            (
                "t1".to_owned(),
                BTreeMap::from([(Class::Gpus, 3), (Class::CpuMillis, 4_000)]),
            ),
        ]);
        let mut h = Harness {
            rt,
            db: Some(db),
            _file: file,
            model: Model {
                now: 1_000 * SEC,
                capacity,
                limits,
                res: BTreeMap::new(),
                ids: Vec::new(),
            },
            next: 0,
        };
        for p in POOLS {
            h.put_pool(p).unwrap();
        }
        for t in TENANTS {
            let limits = Resources::from_lines([
                (&Class::Gpus, h.model.limits[t][&Class::Gpus]),
                (&Class::CpuMillis, h.model.limits[t][&Class::CpuMillis]),
            ]);
            h.run(move |c, e| {
                admin::set_quota(
                    c,
                    e,
                    &QuotaSpec {
                        tenant: TenantId::parse(t).unwrap(),
                        limits: limits.clone(),
                        approval_above: Resources::default(),
                        max_hold: None,
                    },
                    &QuotaMask::Replace,
                )
            })
            .unwrap();
        }
        h
    }

    /// One operation in one transaction at the model's clock; returns the
    /// events it emitted.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut DbConnection, &mut Emitter) -> Result<T, Error> + Send + 'static,
    ) -> Result<(T, Vec<Event>), Error> {
        let now = self.model.now;
        let mut f = f;
        self.rt.block_on(self.db().write(move |c| {
            let mut emit = Emitter::new("prop", now, BTreeMap::new());
            let out = f(c, &mut emit)?;
            let events = emit.events().to_vec();
            emit.flush(c)?;
            Ok((out, events))
        }))
    }

    fn put_pool(&mut self, pool: &str) -> Result<Vec<Event>, Error> {
        let cap = &self.model.capacity[pool];
        let capacity = Capacity {
            cpu_millis: cap.get(&Class::CpuMillis).copied().unwrap_or(0),
            gpus_by_model: cap
                .iter()
                .filter_map(|(c, v)| match c {
                    Class::GpusOf(m) => Some((m.clone(), *v)),
                    _ => None,
                })
                .collect(),
            ..Default::default()
        };
        let spec = PoolSpec {
            id: PoolId::parse(pool).unwrap(),
            capacity,
            max_hold: None,
        };
        self.run(move |c, e| admin::put_pool(c, e, &spec, &PoolMask::Replace))
            .map(|r| r.1)
    }

    fn request_event(&self, id: &str, tenant: &str, r: &MRes) -> Event {
        Event {
            event_id: format!("req-{id}"),
            allocation_id: id.into(),
            tenant: tenant.into(),
            aggregate_version: 1,
            event_time: None,
            payload: Some(Payload::AllocationRequested(ev::AllocationRequested {
                resources: Some(ev::Resources::from(&r.demand)),
                priority: r.priority,
                lease: r.lease.map(time::to_duration),
                create_time: Some(time::to_timestamp(r.request_time)),
                approved: false,
            })),
        }
    }

    fn deliver(&self, e: Event) -> Vec<Event> {
        self.run(move |c, emit| match &e.payload {
            Some(Payload::AllocationRequested(r)) => saga::on_requested(c, emit, &e, r),
            Some(Payload::AllocationCancelled(r)) => saga::on_cancelled(c, emit, &e, r),
            _ => Ok(()),
        })
        .unwrap()
        .1
    }

    fn step(&mut self, a: &Action) {
        let m = &self.model;
        let held_before: BTreeSet<String> = m
            .res
            .iter()
            .filter(|(_, r)| r.state == MState::Held)
            .map(|(id, _)| id.clone())
            .collect();
        let events = match a.clone() {
            Action::Request {
                tenant,
                gpus,
                model,
                cpus,
                priority,
                lease_secs,
            } => {
                let gpus = if gpus == 0 && cpus == 0 { 1 } else { gpus };
                let id = format!("a{:04}", self.next);
                self.next += 1;
                let r = MRes {
                    tenant: TENANTS[tenant].into(),
                    demand: Resources::try_from(pb::Resources {
                        gpus: gpus as i32,
                        gpu_model: model
                            .filter(|_| gpus > 0)
                            .map(|m| MODELS[m].to_owned())
                            .unwrap_or_default(),
                        cpu_millis: cpus * 1_000,
                        ..Default::default()
                    })
                    .unwrap(),
                    priority,
                    request_time: self.model.now,
                    lease: lease_secs.map(|s| s * SEC),
                    state: MState::Ended,
                    request: None,
                };
                let e = self.request_event(&id, TENANTS[tenant], &r);
                let mut r = r;
                r.request = Some(e.clone());
                let events = self.deliver(e);
                self.check_decision(&id, &mut r, &events);
                self.model.ids.push(id.clone());
                self.model.res.insert(id, r);
                events
            }
            Action::Duplicate(i) => {
                let Some(id) = self.pick(i) else { return };
                let Some(e) = self.model.res[&id].request.clone() else {
                    return;
                };
                let events = self.deliver(e);
                // A duplicate only repeats the decision already made.
                for e in &events {
                    assert_eq!(e.allocation_id, id, "a duplicate moved another reservation");
                }
                self.expect_unchanged(&id, &events);
                return self.check_db(&held_before, &[]);
            }
            Action::Cancel(i) => {
                let Some(id) = self.pick(i) else { return };
                let r = self.model.res[&id].clone();
                let events = self.deliver(cancel_event(&id, &r.tenant));
                if r.state == MState::Ended {
                    self.expect_unchanged(&id, &events);
                } else {
                    let released = events
                        .iter()
                        .filter(|e| e.allocation_id == id)
                        .any(|e| matches!(e.payload, Some(Payload::ReservationReleased(_))));
                    assert!(released, "cancelling {id} released nothing: {events:?}");
                }
                events
            }
            Action::CancelFirst { tenant, gpus } => {
                let id = format!("a{:04}", self.next);
                self.next += 1;
                let t = TENANTS[tenant];
                let events = self.deliver(cancel_event(&id, t));
                let r = MRes {
                    tenant: t.into(),
                    demand: Resources::from_lines([(&Class::Gpus, gpus)]),
                    priority: 0,
                    request_time: self.model.now,
                    lease: None,
                    state: MState::Ended,
                    request: None,
                };
                let req = self.request_event(&id, t, &r);
                let late = self.deliver(req.clone());
                for e in &late {
                    assert!(
                        !matches!(
                            e.payload,
                            Some(Payload::ReservationGranted(_) | Payload::ReservationHeld(_))
                        ),
                        "a request after its cancel was taken up: {e:?}"
                    );
                }
                self.model.ids.push(id.clone());
                self.model.res.insert(
                    id,
                    MRes {
                        request: Some(req),
                        ..r
                    },
                );
                events.into_iter().chain(late).collect()
            }
            Action::Tick(secs) => {
                self.model.now += secs * SEC;
                let now = self.model.now;
                let events = self.run(|c, e| saga::sweep(c, e, 1_000)).unwrap().1;
                // Every lease that ended is released, and no other grant.
                for (id, r) in &self.model.res {
                    let due =
                        matches!(r.state, MState::Granted { expire: Some(t), .. } if t <= now);
                    let released = events.iter().any(|e| {
                        &e.allocation_id == id
                            && matches!(&e.payload, Some(Payload::ReservationReleased(x))
                                if x.cause == ev::ReleaseCause::Expired as i32)
                    });
                    assert_eq!(due, released, "lease of {id} at {now}: {r:?}");
                }
                events
            }
            Action::Resize {
                pool,
                class,
                amount,
            } => {
                let p = POOLS[pool];
                let (class, value) = match class {
                    0 => (Class::CpuMillis, amount * 2_000),
                    c => (gpu_class(MODELS[c - 1]), amount),
                };
                let used = self.model.used(p).get(&class).copied().unwrap_or(0);
                let before = self.model.capacity[p].clone();
                self.model
                    .capacity
                    .get_mut(p)
                    .unwrap()
                    .insert(class.clone(), value);
                match self.put_pool(p) {
                    Ok(events) => {
                        assert!(value >= used, "{p} shrank {class} to {value} below {used}");
                        events
                    }
                    Err(e) => {
                        assert!(value < used, "{p} refused {class} = {value}: {e}");
                        self.model.capacity.insert(p.to_owned(), before);
                        return self.check_db(&held_before, &[]);
                    }
                }
            }
        };
        let admitted = self.apply_background(&held_before, &events);
        self.check_db(&held_before, &admitted);
    }

    fn pick(&self, i: usize) -> Option<String> {
        (!self.model.ids.is_empty()).then(|| self.model.ids[i % self.model.ids.len()].clone())
    }

    /// Checks the pool's decision on a new request against the model,
    /// before the model records it.
    fn check_decision(&self, id: &str, r: &mut MRes, events: &[Event]) {
        let mine: Vec<&Event> = events.iter().filter(|e| e.allocation_id == id).collect();
        assert_eq!(mine.len(), 1, "one decision for {id}: {events:?}");
        let m = &self.model;
        let d = &r.demand;
        match &mine[0].payload {
            Some(Payload::ReservationRejected(x))
                if x.cause == ev::RejectCause::Unsatisfiable as i32 =>
            {
                assert!(
                    !m.ever_fits(d),
                    "{id} rejected as unsatisfiable but fits: {d:?}"
                );
            }
            Some(Payload::ReservationRejected(x)) => {
                assert_eq!(x.cause, ev::RejectCause::ExceedsQuota as i32);
                assert!(m.ever_fits(d));
                assert!(
                    !m.within_quota(&r.tenant, d),
                    "{id} rejected but within quota"
                );
            }
            Some(Payload::ReservationHeld(_)) => {
                assert!(m.within_quota(&r.tenant, d), "{id} held over quota");
                assert!(m.ever_fits(d));
                assert!(!m.fits_now_anywhere(d), "{id} held although it fits now");
                r.state = MState::Held;
            }
            Some(Payload::ReservationGranted(g)) => {
                assert!(m.within_quota(&r.tenant, d), "{id} granted over quota");
                r.state = self.granted(id, d, r.lease, g);
                // Best fit: no other layout leaves fewer GPUs of its model.
                if d.gpus() > 0 {
                    let chosen = match &r.state {
                        MState::Granted { pool, lines, .. } => {
                            let (c, _) = lines
                                .iter()
                                .find(|(c, _)| matches!(c, Class::GpusOf(_)))
                                .unwrap();
                            m.free(pool)[c] - d.gpus()
                        }
                        _ => unreachable!(),
                    };
                    for p in POOLS {
                        let free = m.free(p);
                        for (_, lines) in m.layouts(p, d) {
                            if Model::fits(&free, &lines) {
                                let (c, _) = lines
                                    .iter()
                                    .find(|(c, _)| matches!(c, Class::GpusOf(_)))
                                    .unwrap();
                                assert!(
                                    free[c] - d.gpus() >= chosen,
                                    "{id} not placed by best fit"
                                );
                            }
                        }
                    }
                }
            }
            other => panic!("unexpected decision for {id}: {other:?}"),
        }
    }

    /// The model state of a grant, checked against the free capacity.
    fn granted(
        &self,
        id: &str,
        d: &Resources,
        lease: Option<i64>,
        g: &ev::ReservationGranted,
    ) -> MState {
        let m = &self.model;
        let layouts = m.layouts(&g.pool_id, d);
        let (_, lines) = layouts
            .iter()
            .find(|(model, _)| model.clone().unwrap_or_default() == g.gpu_model)
            .unwrap_or_else(|| panic!("{id} granted as {g:?}, not a layout of {d:?}"));
        assert!(
            Model::fits(&m.free(&g.pool_id), lines),
            "{id} granted on {} where it does not fit",
            g.pool_id
        );
        assert_eq!(
            g.expire_time.as_ref().map(time::from_timestamp),
            lease.map(|l| m.now + l)
        );
        MState::Granted {
            pool: g.pool_id.clone(),
            lines: lines.clone(),
            expire: lease.map(|l| m.now + l),
        }
    }

    fn expect_unchanged(&self, id: &str, events: &[Event]) {
        for e in events {
            let ok = match (&self.model.res[id].state, &e.payload) {
                (MState::Held, Some(Payload::ReservationHeld(_))) => true,
                (MState::Granted { pool, .. }, Some(Payload::ReservationGranted(g))) => {
                    &g.pool_id == pool
                }
                (
                    MState::Ended,
                    Some(Payload::ReservationReleased(_) | Payload::ReservationRejected(_)),
                ) => true,
                _ => false,
            };
            assert!(
                ok,
                "a repeated delivery for {id} changed its decision: {e:?}"
            );
        }
    }

    /// Applies releases, admissions and rejections of held requests to the
    /// model; returns the ids admitted from the queue in this step.
    fn apply_background(
        &mut self,
        held_before: &BTreeSet<String>,
        events: &[Event],
    ) -> Vec<String> {
        let mut admitted = Vec::new();
        for e in events {
            let id = &e.allocation_id;
            let Some(r) = self.model.res.get(id).cloned() else {
                continue;
            };
            match &e.payload {
                Some(Payload::ReservationReleased(_)) => {
                    self.model.res.get_mut(id).unwrap().state = MState::Ended;
                }
                Some(Payload::ReservationRejected(x)) if r.state == MState::Held => {
                    assert_eq!(x.cause, ev::RejectCause::Unsatisfiable as i32);
                    assert!(
                        !self.model.ever_fits(&r.demand),
                        "held {id} rejected but could fit"
                    );
                    self.model.res.get_mut(id).unwrap().state = MState::Ended;
                }
                Some(Payload::ReservationGranted(g)) if r.state == MState::Held => {
                    assert!(held_before.contains(id));
                    let s = self.granted(id, &r.demand, r.lease, g);
                    self.model.res.get_mut(id).unwrap().state = s;
                    admitted.push(id.clone());
                }
                _ => {}
            }
        }
        admitted
    }

    /// The database equals the model, and the invariants hold.
    fn check_db(&self, _held_before: &BTreeSet<String>, admitted: &[String]) {
        let m = &self.model;
        let (pools, tenants, rows) = self
            .rt
            .block_on(self.db().read(|c| {
                let pools = store::pool_states(c)?;
                let mut tenants = BTreeMap::new();
                for t in TENANTS {
                    tenants.insert(t.to_owned(), store::load_tenant(c, t)?.unwrap().1);
                }
                let mut rows = BTreeMap::new();
                for r in store::held(c)? {
                    rows.insert(r.allocation_id.clone(), r.state.clone());
                }
                Ok::<_, Error>((pools, tenants, rows))
            }))
            .unwrap();
        for p in &pools {
            let id = p.id.as_str();
            let used = m.used(id);
            for (class, cap) in &p.capacity {
                let u = p.used.get(class).copied().unwrap_or(0);
                assert_eq!(
                    u,
                    used.get(class).copied().unwrap_or(0),
                    "{id} {class} counter"
                );
                assert!(u <= *cap, "{id} {class}: {u} granted > capacity {cap}");
                assert_eq!(m.capacity[id].get(class).copied().unwrap_or(0), *cap);
            }
        }
        for (t, s) in &tenants {
            let charged = m.charged(t, false);
            let granted = m.charged(t, true);
            for (class, limit) in &s.limits {
                let c = s.charged.get(class).copied().unwrap_or(0);
                assert_eq!(
                    c,
                    charged.get(class).copied().unwrap_or(0),
                    "{t} {class} charged"
                );
                assert_eq!(
                    s.granted.get(class).copied().unwrap_or(0),
                    granted.get(class).copied().unwrap_or(0),
                    "{t} {class} granted"
                );
                assert!(c <= *limit, "{t} {class}: {c} > quota {limit}");
            }
        }
        let held: Vec<&String> = m
            .res
            .iter()
            .filter(|(_, r)| r.state == MState::Held)
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            held,
            "held queue in the database vs the model"
        );
        for id in &held {
            let d = &m.res[*id].demand;
            assert!(!m.fits_now_anywhere(d), "held {id} fits now: {d:?}");
            // Admission order: giving back what requests behind it took in
            // this step must not make it fit.
            for p in POOLS {
                let mut free = m.free(p);
                for a in admitted {
                    if m.order(id, a) == Ordering::Less
                        && let MState::Granted { pool, lines, .. } = &m.res[a].state
                        && pool == p
                    {
                        for (c, v) in lines {
                            *free.entry(c.clone()).or_insert(0) += v;
                        }
                    }
                }
                for (_, lines) in m.layouts(p, d) {
                    assert!(
                        !Model::fits(&free, &lines),
                        "held {id} was passed over on {p} by later requests {admitted:?}"
                    );
                }
            }
        }
    }
}

impl Harness {
    fn db(&self) -> &Db {
        self.db.as_ref().unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _runtime = self.rt.enter();
        drop(self.db.take());
    }
}

fn cancel_event(id: &str, tenant: &str) -> Event {
    Event {
        event_id: format!("cancel-{id}-{}", uuid_like()),
        allocation_id: id.into(),
        tenant: tenant.into(),
        aggregate_version: 2,
        event_time: None,
        payload: Some(Payload::AllocationCancelled(ev::AllocationCancelled {
            reason: "property test".into(),
        })),
    }
}

fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GPUALLOC_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn reservations_follow_the_reference_model(actions in prop::collection::vec(action(), 1..60)) {
        let mut h = Harness::new();
        for a in &actions {
            h.step(a);
        }
    }
}
