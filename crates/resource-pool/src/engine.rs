//! The placement and quota rules, as pure functions over in-memory state.
//! The store loads the state inside the decision transaction, asks these
//! functions, and writes the result back with guarded counter updates;
//! the property tests drive the same functions against a reference model.
//!
//! Placement policy: a request goes on exactly one pool, every class at
//! once. Among the pools where it fits now, the best fit wins:
//! 1. GPU requests: least leftover of the GPU model granted (with
//!    `gpu_model` empty, every model of the pool is a candidate), so small
//!    requests fill fragments and whole nodes stay free for large ones;
//!    requests without GPUs prefer the pools with the fewest free GPUs,
//!    keeping GPU pools for GPU work;
//! 2. then least leftover CPU, then memory;
//! 3. then the pool id, so that every replica decides alike.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
};

use gpualloc_domain::{Class, GpuModel, PoolId, Resources};

/// Amounts per class.
pub type Lines = Vec<(Class, i64)>;

/// A pool's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolState {
    pub id: PoolId,
    pub max_hold: Option<i64>,
    pub capacity: BTreeMap<Class, i64>,
    pub used: BTreeMap<Class, i64>,
}

impl PoolState {
    pub fn free(&self, class: &Class) -> i64 {
        self.capacity.get(class).copied().unwrap_or(0) - self.used.get(class).copied().unwrap_or(0)
    }

    pub fn fits_now(&self, lines: &[(Class, i64)]) -> bool {
        lines.iter().all(|(c, v)| self.free(c) >= *v)
    }

    pub fn fits_empty(&self, lines: &[(Class, i64)]) -> bool {
        lines
            .iter()
            .all(|(c, v)| self.capacity.get(c).copied().unwrap_or(0) >= *v)
    }

    pub fn take(&mut self, lines: &[(Class, i64)]) {
        for (c, v) in lines {
            *self.used.entry(c.clone()).or_default() += v;
        }
    }

    pub fn give_back(&mut self, lines: &[(Class, i64)]) {
        for (c, v) in lines {
            *self.used.entry(c.clone()).or_default() -= v;
        }
    }

    fn gpu_models(&self) -> impl Iterator<Item = &GpuModel> {
        self.capacity.keys().filter_map(|c| match c {
            Class::GpusOf(m) => Some(m),
            _ => None,
        })
    }

    fn free_gpus(&self) -> i64 {
        self.capacity
            .keys()
            .filter(|c| matches!(c, Class::GpusOf(_)))
            .map(|c| self.free(c))
            .sum()
    }

    /// The ways `demand` could be laid out on this pool: one per GPU model
    /// it may use.
    fn layouts(&self, demand: &Resources) -> Vec<(Option<GpuModel>, Lines)> {
        if demand.gpus() == 0 {
            return vec![(None, demand.pool_lines(None))];
        }
        match demand.gpu_model() {
            Some(m) => vec![(Some(m.clone()), demand.pool_lines(Some(m)))],
            None => self
                .gpu_models()
                .map(|m| (Some(m.clone()), demand.pool_lines(Some(m))))
                .collect(),
        }
    }
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub pool: PoolId,
    pub model: Option<GpuModel>,
    /// Pool-class amounts to take.
    pub lines: Vec<(Class, i64)>,
}

/// Best-fit placement among pools where `demand` fits now (see the module
/// docs); `None` when it fits nowhere now.
pub fn place(demand: &Resources, pools: &[PoolState]) -> Option<Placement> {
    let mut best: Option<((i64, i64, i64), Placement)> = None;
    for pool in pools {
        for (model, lines) in pool.layouts(demand) {
            if !pool.fits_now(&lines) {
                continue;
            }
            let gpu_score = match &model {
                Some(m) => pool.free(&Class::GpusOf(m.clone())) - demand.gpus(),
                None => pool.free_gpus(),
            };
            let score = (
                gpu_score,
                pool.free(&Class::CpuMillis) - demand.cpu_millis(),
                pool.free(&Class::MemoryMib) - demand.memory_mib(),
            );
            let better = match &best {
                None => true,
                Some((s, p)) => match score.cmp(s) {
                    Ordering::Less => true,
                    Ordering::Equal => pool.id < p.pool,
                    Ordering::Greater => false,
                },
            };
            if better {
                best = Some((
                    score,
                    Placement {
                        pool: pool.id.clone(),
                        model,
                        lines,
                    },
                ));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Whether some pool could hold `demand` if it were empty.
pub fn ever_fits(demand: &Resources, pools: &[PoolState]) -> bool {
    candidates(demand, pools).next().is_some()
}

/// Pools that could hold `demand` if they were empty.
pub fn candidates<'a>(
    demand: &'a Resources,
    pools: &'a [PoolState],
) -> impl Iterator<Item = &'a PoolState> + 'a {
    pools.iter().filter(move |p| {
        p.layouts(demand)
            .iter()
            .any(|(_, lines)| p.fits_empty(lines))
    })
}

/// A tenant's quota counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantState {
    pub limits: BTreeMap<Class, i64>,
    /// Granted plus held.
    pub charged: BTreeMap<Class, i64>,
    pub granted: BTreeMap<Class, i64>,
    pub approval_above: Resources,
    pub max_hold: Option<i64>,
}

/// One class over quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaViolation {
    pub class: Class,
    pub limit: i64,
    pub used: i64,
    pub requested: i64,
}

impl QuotaViolation {
    /// One line per class. A class the quota does not grant at all says
    /// so, instead of the puzzling "0 of 0".
    pub fn describe(&self) -> String {
        if self.limit == 0 {
            return format!(
                "{}: the tenant's quota has no {} ({} requested); an administrator must grant some",
                self.class, self.class, self.requested
            );
        }
        format!(
            "{}: {} requested, {} of {} already in use",
            self.class, self.requested, self.used, self.limit
        )
    }
}

pub fn quota_violations(demand: &Resources, tenant: &TenantState) -> Vec<QuotaViolation> {
    demand
        .quota_lines()
        .into_iter()
        .filter_map(|(class, requested)| {
            let limit = tenant.limits.get(&class).copied().unwrap_or(0);
            let used = tenant.charged.get(&class).copied().unwrap_or(0);
            (used + requested > limit).then_some(QuotaViolation {
                class,
                limit,
                used,
                requested,
            })
        })
        .collect()
}

/// The answer to "would this be admitted now?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed(Placement),
    InsufficientCapacity,
    ExceedsQuota {
        reason: String,
        violations: Vec<QuotaViolation>,
    },
    Unsatisfiable(String),
}

/// Why no pool could ever hold `demand`: a GPU model or custom class no
/// pool has is named, with the ones that exist (and the one that differs
/// only in case, the usual slip).
pub fn unsatisfiable_reason(demand: &Resources, pools: &[PoolState]) -> String {
    if pools.is_empty() {
        return "there are no pools".into();
    }
    let mut models = BTreeSet::new();
    let mut customs = BTreeSet::new();
    for class in pools.iter().flat_map(|p| p.capacity.keys()) {
        match class {
            Class::GpusOf(m) => {
                models.insert(m.to_string());
            }
            Class::Custom(c) => {
                customs.insert(c.to_string());
            }
            _ => {}
        }
    }
    let unknown = |kind: &str, name: &str, known: &BTreeSet<String>| {
        let hint = known
            .iter()
            .find(|k| k.eq_ignore_ascii_case(name))
            .map(|k| format!(" (names are case-sensitive: did you mean \"{k}\"?)"))
            .unwrap_or_default();
        let known = if known.is_empty() {
            "none".to_owned()
        } else {
            known.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        format!(
            "no pool has {kind} {}{hint}; known: {known}",
            gpualloc_domain::shown(name)
        )
    };
    if let Some(m) = demand.gpu_model()
        && !models.contains(m.as_str())
    {
        return unknown("GPU model", m.as_str(), &models);
    }
    if let Some(c) = demand
        .custom()
        .keys()
        .find(|c| !customs.contains(c.as_str()))
    {
        return unknown("custom class", c.as_str(), &customs);
    }
    "no pool is large enough for this request, even when empty".into()
}

/// Decides a request the way the saga does. The order matters: a tenant
/// without quota is told so first; a request no pool could ever hold is
/// UNSATISFIABLE even if it is also over quota (no quota change would help).
pub fn decide(demand: &Resources, tenant: Option<&TenantState>, pools: &[PoolState]) -> Verdict {
    let Some(tenant) = tenant else {
        return Verdict::ExceedsQuota {
            reason: "the tenant has no quota; an administrator must set one".into(),
            violations: Vec::new(),
        };
    };
    if !ever_fits(demand, pools) {
        return Verdict::Unsatisfiable(unsatisfiable_reason(demand, pools));
    }
    let violations = quota_violations(demand, tenant);
    if !violations.is_empty() {
        let detail: Vec<String> = violations.iter().map(QuotaViolation::describe).collect();
        return Verdict::ExceedsQuota {
            reason: format!("over quota: {}", detail.join("; ")),
            violations,
        };
    }
    match place(demand, pools) {
        Some(p) => Verdict::Allowed(p),
        None => Verdict::InsufficientCapacity,
    }
}

/// When a request held now must be rejected: the tenant's limit, and the
/// most patient limit among the pools that could ever hold it (when all
/// of them have one).
pub fn hold_deadline(
    now: i64,
    demand: &Resources,
    tenant: &TenantState,
    pools: &[PoolState],
) -> Option<i64> {
    let mut pool_limit: Option<i64> = None;
    for p in candidates(demand, pools) {
        match p.max_hold {
            None => {
                pool_limit = None;
                break;
            }
            Some(h) => pool_limit = Some(pool_limit.map_or(h, |l| l.max(h))),
        }
    }
    let limit = match (pool_limit, tenant.max_hold) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    limit.map(|l| now.saturating_add(l))
}

/// A request waiting for capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub allocation_id: String,
    pub priority: i32,
    pub request_time: i64,
    pub demand: Resources,
}

/// Admission order: priority (higher first), then age, then id.
pub fn admission_order(a: &Held, b: &Held) -> Ordering {
    b.priority
        .cmp(&a.priority)
        .then(a.request_time.cmp(&b.request_time))
        .then_with(|| a.allocation_id.cmp(&b.allocation_id))
}

/// Admits held requests in admission order wherever they fit now. A request
/// that does not fit is skipped, never blocking those behind it (other GPU
/// models, smaller requests). `pools` is updated with every admission.
pub fn admit(held: &mut [Held], pools: &mut [PoolState]) -> Vec<(String, Placement)> {
    held.sort_by(admission_order);
    let mut out = Vec::new();
    for h in held.iter() {
        if let Some(p) = place(&h.demand, pools) {
            if let Some(pool) = pools.iter_mut().find(|x| x.id == p.pool) {
                pool.take(&p.lines);
            }
            out.push((h.allocation_id.clone(), p));
        }
    }
    out
}

/// Capacity a granted allocation gives back when its lease ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub at: i64,
    pub pool: PoolId,
    pub lines: Vec<(Class, i64)>,
}

/// When each held request would be admitted if nothing but time passed:
/// the queue is admitted exactly as [`admit`] does, at the current time
/// and then at every lease end (`releases`, and the ends of the leases of
/// requests admitted along the way, `leases` by allocation id). A request
/// still waiting when no lease is left to end gets no estimate: it waits
/// for capacity held without a lease, which nothing says the end of.
pub fn estimate_starts(
    held: &[Held],
    leases: &BTreeMap<String, i64>,
    pools: &[PoolState],
    releases: &[Release],
    now: i64,
) -> BTreeMap<String, i64> {
    let mut pools = pools.to_vec();
    let mut waiting = held.to_vec();
    let mut pending: Vec<Release> = releases.iter().filter(|r| r.at > now).cloned().collect();
    // Leases already over are released by the sweeper any moment now.
    for r in releases.iter().filter(|r| r.at <= now) {
        if let Some(p) = pools.iter_mut().find(|p| p.id == r.pool) {
            p.give_back(&r.lines);
        }
    }
    let mut out = BTreeMap::new();
    let mut t = now;
    loop {
        for (id, placement) in admit(&mut waiting, &mut pools) {
            if let Some(lease) = leases.get(&id) {
                pending.push(Release {
                    at: t.saturating_add(*lease),
                    pool: placement.pool.clone(),
                    lines: placement.lines.clone(),
                });
            }
            out.insert(id, t);
        }
        waiting.retain(|h| !out.contains_key(&h.allocation_id));
        if waiting.is_empty() {
            break;
        }
        let Some(next) = pending.iter().map(|r| r.at).min() else {
            break;
        };
        t = next;
        pending.retain(|r| {
            if r.at == next {
                if let Some(p) = pools.iter_mut().find(|p| p.id == r.pool) {
                    p.give_back(&r.lines);
                }
                false
            } else {
                true
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use gpualloc_domain::{CustomClass, GpuModel};

    use super::*;

    fn pool(id: &str, gpus: &[(&str, i64)], cpu: i64) -> PoolState {
        let mut capacity = BTreeMap::new();
        capacity.insert(Class::CpuMillis, cpu);
        for (m, n) in gpus {
            capacity.insert(Class::GpusOf(GpuModel::parse(*m).unwrap()), *n);
        }
        PoolState {
            id: PoolId::parse(id).unwrap(),
            max_hold: None,
            capacity,
            used: BTreeMap::new(),
        }
    }

    fn gpus(n: i64, model: &str) -> Resources {
        Resources::try_from(gpualloc_proto::resourcepool::v1::Resources {
            gpus: n as i32,
            gpu_model: model.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn starts_are_estimated_from_the_leases_that_end() {
        let a100 = |n| vec![(Class::GpusOf(GpuModel::parse("A100").unwrap()), n)];
        let mut p = pool("a", &[("A100", 4)], 0);
        p.used = a100(4).into_iter().collect();
        let held = |id: &str, prio: i32, t: i64, n: i64| Held {
            allocation_id: id.into(),
            priority: prio,
            request_time: t,
            demand: gpus(n, "A100"),
        };
        // 4 used: 2 end at 100, 2 at 300 (two leases); nothing else ends.
        let releases = [
            Release {
                at: 100,
                pool: p.id.clone(),
                lines: a100(2),
            },
            Release {
                at: 300,
                pool: p.id.clone(),
                lines: a100(2),
            },
        ];
        // "first" (priority 10) gets the two GPUs freed at 100; its own
        // 50-long lease frees them again at 150 for "second"; "third"
        // waits for the ones freed at 300.
        let queue = [
            held("second", 0, 1, 2),
            held("first", 10, 2, 2),
            held("third", 0, 3, 2),
        ];
        let leases = BTreeMap::from([("first".to_owned(), 50)]);
        let got = estimate_starts(&queue, &leases, &[p.clone()], &releases, 10);
        assert_eq!(got.get("first"), Some(&100));
        assert_eq!(got.get("second"), Some(&150), "{got:?}");
        assert_eq!(got.get("third"), Some(&300), "{got:?}");
        // Without lease ends, nothing can be promised.
        let got = estimate_starts(&queue, &BTreeMap::new(), &[p.clone()], &[], 10);
        assert!(got.is_empty(), "{got:?}");
        // What fits now starts now.
        let mut empty = p;
        empty.used.clear();
        let got = estimate_starts(&queue[..1], &BTreeMap::new(), &[empty], &[], 10);
        assert_eq!(got.get("second"), Some(&10));
    }

    #[test]
    fn an_unknown_model_or_class_is_named_with_the_known_ones() {
        let pools = [
            pool("a", &[("A100", 4)], 8_000),
            pool("h", &[("H100", 2)], 8_000),
        ];
        assert_eq!(
            unsatisfiable_reason(&gpus(1, "B200"), &pools),
            "no pool has GPU model \"B200\"; known: A100, H100"
        );
        assert_eq!(
            unsatisfiable_reason(&gpus(1, "a100"), &pools),
            "no pool has GPU model \"a100\" (names are case-sensitive: did you mean \"A100\"?); known: A100, H100"
        );
        let seats =
            Resources::from_lines([(&Class::Custom(CustomClass::parse("SEAT").unwrap()), 1)]);
        assert_eq!(
            unsatisfiable_reason(&seats, &pools),
            "no pool has custom class \"SEAT\"; known: none"
        );
        assert_eq!(
            unsatisfiable_reason(&gpus(5, "A100"), &pools),
            "no pool is large enough for this request, even when empty"
        );
        assert_eq!(
            unsatisfiable_reason(&gpus(1, ""), &[]),
            "there are no pools"
        );
        // decide gives the same reason.
        assert_eq!(
            decide(&gpus(1, "B200"), Some(&TenantState::default()), &pools),
            Verdict::Unsatisfiable(unsatisfiable_reason(&gpus(1, "B200"), &pools))
        );
    }

    #[test]
    fn a_class_the_quota_lacks_is_named_not_counted() {
        let v = QuotaViolation {
            class: Class::StorageGib,
            limit: 0,
            used: 0,
            requested: 500,
        };
        assert!(
            v.describe().contains("quota has no storage_gib"),
            "{}",
            v.describe()
        );
        assert!(!v.describe().contains("0 of 0"));
    }

    #[test]
    fn best_fit_leaves_the_big_pool_whole() {
        let pools = [
            pool("big", &[("A100", 8)], 0),
            pool("small", &[("A100", 2)], 0),
        ];
        let p = place(&gpus(2, "A100"), &pools).unwrap();
        assert_eq!(p.pool.as_str(), "small");
        let p = place(&gpus(8, ""), &pools).unwrap();
        assert_eq!(p.pool.as_str(), "big");
        assert_eq!(p.model.unwrap().as_str(), "A100");
    }

    #[test]
    fn any_model_picks_the_tightest_model() {
        let pools = [pool("mixed", &[("A100", 4), ("H100", 2)], 0)];
        let p = place(&gpus(2, ""), &pools).unwrap();
        assert_eq!(p.model.unwrap().as_str(), "H100");
    }

    #[test]
    fn cpu_work_avoids_gpu_pools() {
        let pools = [
            pool("gpu", &[("A100", 8)], 64_000),
            pool("cpu", &[], 64_000),
        ];
        let demand = Resources::from_lines([(&Class::CpuMillis, 1000)]);
        assert_eq!(place(&demand, &pools).unwrap().pool.as_str(), "cpu");
    }

    #[test]
    fn all_classes_must_fit_on_one_pool() {
        let mut a = pool("a", &[("A100", 4)], 1000);
        let b = pool("b", &[], 8000);
        a.used.insert(Class::CpuMillis, 0);
        let demand = Resources::from_lines([(&Class::CpuMillis, 4000), (&Class::Gpus, 1)]);
        // GPUs only on a, CPU only enough on b: fits nowhere, ever.
        assert_eq!(place(&demand, &[a.clone(), b.clone()]), None);
        assert!(!ever_fits(&demand, &[a, b]));
    }

    #[test]
    fn custom_classes_are_counted() {
        let seat = CustomClass::parse("SEAT").unwrap();
        let mut hall = pool("hall", &[], 0);
        hall.capacity.insert(Class::Custom(seat.clone()), 5);
        let book = Resources::from_lines([(&Class::Custom(seat.clone()), 3)]);
        let p = place(&book, std::slice::from_ref(&hall)).unwrap();
        hall.take(&p.lines);
        assert_eq!(hall.free(&Class::Custom(seat.clone())), 2);
        assert_eq!(place(&book, std::slice::from_ref(&hall)), None);
        hall.give_back(&p.lines);
        assert!(place(&book, &[hall]).is_some());
    }

    #[test]
    fn verdicts_in_order() {
        let pools = [pool("p", &[("A100", 4)], 0)];
        let mut t = TenantState::default();
        t.limits.insert(Class::Gpus, 6);
        assert!(matches!(
            decide(&gpus(1, ""), None, &pools),
            Verdict::ExceedsQuota { .. }
        ));
        assert!(matches!(
            decide(&gpus(5, ""), Some(&t), &pools),
            Verdict::Unsatisfiable(_)
        ));
        assert!(matches!(
            decide(&gpus(2, "H100"), Some(&t), &pools),
            Verdict::Unsatisfiable(_)
        ));
        assert!(matches!(
            decide(&gpus(4, ""), Some(&t), &pools),
            Verdict::Allowed(_)
        ));
        t.charged.insert(Class::Gpus, 4);
        match decide(&gpus(3, ""), Some(&t), &pools) {
            Verdict::ExceedsQuota { violations, .. } => {
                assert_eq!(violations[0].used, 4);
                assert_eq!(violations[0].limit, 6);
            }
            other => panic!("{other:?}"),
        }
        let mut busy = pools.clone();
        busy[0]
            .used
            .insert(Class::GpusOf(GpuModel::parse("A100").unwrap()), 3);
        assert_eq!(
            decide(&gpus(2, ""), Some(&t), &busy),
            Verdict::InsufficientCapacity
        );
    }

    #[test]
    fn admission_skips_what_does_not_fit() {
        let mut pools = vec![pool("a", &[("A100", 2)], 0), pool("h", &[("H100", 1)], 0)];
        let held = |id: &str, prio: i32, t: i64, d: Resources| Held {
            allocation_id: id.into(),
            priority: prio,
            request_time: t,
            demand: d,
        };
        let mut queue = vec![
            held("old-big", 0, 1, gpus(4, "A100")),
            held("h100", 0, 2, gpus(1, "H100")),
            held("young", 0, 3, gpus(2, "A100")),
            held("urgent", 5, 9, gpus(1, "A100")),
        ];
        let admitted: Vec<String> = admit(&mut queue, &mut pools)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // Priority first; the big request that cannot fit blocks nobody.
        assert_eq!(admitted, ["urgent", "h100"]);
    }

    #[test]
    fn hold_deadline_takes_the_tighter_of_tenant_and_pools() {
        let mut a = pool("a", &[("A100", 4)], 0);
        let mut b = pool("b", &[("A100", 8)], 0);
        let t = TenantState::default();
        assert_eq!(
            hold_deadline(100, &gpus(2, ""), &t, &[a.clone(), b.clone()]),
            None
        );
        a.max_hold = Some(10);
        assert_eq!(
            hold_deadline(100, &gpus(2, ""), &t, &[a.clone(), b.clone()]),
            None
        );
        b.max_hold = Some(50);
        assert_eq!(
            hold_deadline(100, &gpus(2, ""), &t, &[a.clone(), b.clone()]),
            Some(150)
        );
        // Only b could hold 6 GPUs.
        assert_eq!(
            hold_deadline(100, &gpus(6, ""), &t, &[a.clone(), b.clone()]),
            Some(150)
        );
        let t = TenantState {
            max_hold: Some(20),
            ..Default::default()
        };
        assert_eq!(hold_deadline(100, &gpus(2, ""), &t, &[a, b]), Some(120));
    }
}
