//! Partial updates (AIP-134) of quotas and pools: which fields an
//! `update_mask` names, and the merge of the stored value with the request
//! under it. Pure: the RPCs parse the mask at the edge, and merge inside the
//! write transaction, against the value the transaction read.
//!
//! A mask is either absent (or empty, or `*`): the request replaces the
//! whole object, as before masks existed; or a set of fields: only those
//! change, and the object must exist.

use std::collections::BTreeSet;

use gpualloc_domain::{Capacity, ResourceField, Resources, Violations};

/// The field paths of a `Resources` bundle (quota limits and approval
/// thresholds).
const RESOURCE_FIELDS: [(&str, ResourceField); 5] = [
    ("cpu_millis", ResourceField::CpuMillis),
    ("memory_mib", ResourceField::MemoryMib),
    ("gpus", ResourceField::Gpus),
    ("storage_gib", ResourceField::StorageGib),
    ("custom", ResourceField::Custom),
];

/// The fields of a pool's `Capacity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CapacityField {
    CpuMillis,
    MemoryMib,
    StorageGib,
    GpusByModel,
    Custom,
}

impl CapacityField {
    const ALL: [(&'static str, CapacityField); 5] = [
        ("cpu_millis", CapacityField::CpuMillis),
        ("memory_mib", CapacityField::MemoryMib),
        ("storage_gib", CapacityField::StorageGib),
        ("gpus_by_model", CapacityField::GpusByModel),
        ("custom", CapacityField::Custom),
    ];
}

/// What a `SetTenantQuota` changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuotaMask {
    /// The whole quota (no mask).
    Replace,
    Fields {
        limits: BTreeSet<ResourceField>,
        approval_above: BTreeSet<ResourceField>,
        max_hold: bool,
    },
}

/// What a `PutPool` changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolMask {
    /// The whole pool (no mask).
    Replace,
    Fields {
        capacity: BTreeSet<CapacityField>,
        max_hold: bool,
    },
}

/// The parts of a quota a mask merges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaParts {
    pub limits: Resources,
    pub approval_above: Resources,
    pub max_hold: Option<i64>,
}

/// The parts of a pool a mask merges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolParts {
    pub capacity: Capacity,
    pub max_hold: Option<i64>,
}

/// `name` or `name.<field>` of a message with `fields`: every field, or
/// the one named. `None` when the path is not about `name`.
fn sub_path<F: Copy + Ord>(
    path: &str,
    name: &str,
    fields: &[(&str, F)],
) -> Option<Result<BTreeSet<F>, String>> {
    if path == name {
        return Some(Ok(fields.iter().map(|(_, f)| *f).collect()));
    }
    let rest = path.strip_prefix(name)?.strip_prefix('.')?;
    Some(
        fields
            .iter()
            .find(|(n, _)| *n == rest)
            .map(|(_, f)| BTreeSet::from([*f]))
            .ok_or_else(|| {
                let known: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
                format!(
                    "{name} has no field {}; known: {}",
                    gpualloc_domain::shown(rest),
                    known.join(", ")
                )
            }),
    )
}

/// Whether the mask asks for a full replace: absent, empty, or `*`.
fn replaces(paths: &[String]) -> Result<bool, Violations> {
    if paths.is_empty() {
        return Ok(true);
    }
    if paths.iter().any(|p| p == "*") {
        if paths.len() > 1 {
            return Err(Violations::single(
                "update_mask.paths",
                "\"*\" replaces everything and cannot be combined with other paths",
            ));
        }
        return Ok(true);
    }
    Ok(false)
}

impl QuotaMask {
    /// Parses `update_mask.paths` of a SetTenantQuotaRequest.
    pub fn parse(paths: &[String]) -> Result<QuotaMask, Violations> {
        if replaces(paths)? {
            return Ok(QuotaMask::Replace);
        }
        let mut v = Violations::new();
        let (mut limits, mut approval_above, mut max_hold) =
            (BTreeSet::new(), BTreeSet::new(), false);
        for (i, path) in paths.iter().enumerate() {
            let field = format!("update_mask.paths[{i}]");
            if path == "max_hold" {
                max_hold = true;
            } else if let Some(r) = sub_path(path, "limits", &RESOURCE_FIELDS) {
                match r {
                    Ok(f) => limits.extend(f),
                    Err(e) => v.add(field, e),
                }
            } else if let Some(r) = sub_path(path, "approval_above", &RESOURCE_FIELDS) {
                match r {
                    Ok(f) => approval_above.extend(f),
                    Err(e) => v.add(field, e),
                }
            } else if path == "tenant" {
                v.add(field, "tenant names the quota; it cannot be updated");
            } else {
                v.add(
                    field,
                    format!(
                        "unknown field path {}; known: limits, approval_above (or one of their fields, e.g. limits.gpus), max_hold",
                        gpualloc_domain::shown(path)
                    ),
                );
            }
        }
        if v.is_empty() {
            Ok(QuotaMask::Fields {
                limits,
                approval_above,
                max_hold,
            })
        } else {
            Err(v)
        }
    }

    /// The quota after the update: `new` where the mask names a field,
    /// `current` elsewhere. A replace ignores `current` (which may not
    /// exist).
    pub fn apply(&self, current: Option<&QuotaParts>, new: QuotaParts) -> Option<QuotaParts> {
        match self {
            QuotaMask::Replace => Some(new),
            QuotaMask::Fields {
                limits,
                approval_above,
                max_hold,
            } => {
                let current = current?;
                Some(QuotaParts {
                    limits: merge_resources(&current.limits, &new.limits, limits),
                    approval_above: merge_resources(
                        &current.approval_above,
                        &new.approval_above,
                        approval_above,
                    ),
                    max_hold: if *max_hold {
                        new.max_hold
                    } else {
                        current.max_hold
                    },
                })
            }
        }
    }
}

impl PoolMask {
    /// Parses `update_mask.paths` of a PutPoolRequest (relative to Pool).
    pub fn parse(paths: &[String]) -> Result<PoolMask, Violations> {
        if replaces(paths)? {
            return Ok(PoolMask::Replace);
        }
        let mut v = Violations::new();
        let (mut capacity, mut max_hold) = (BTreeSet::new(), false);
        for (i, path) in paths.iter().enumerate() {
            let field = format!("update_mask.paths[{i}]");
            if path == "max_hold" {
                max_hold = true;
            } else if let Some(r) = sub_path(path, "capacity", &CapacityField::ALL) {
                match r {
                    Ok(f) => capacity.extend(f),
                    Err(e) => v.add(field, e),
                }
            } else if ["usage", "free", "version", "create_time", "update_time"]
                .iter()
                .any(|o| path == o || path.starts_with(&format!("{o}.")))
            {
                v.add(
                    field,
                    format!("{} is output only", gpualloc_domain::shown(path)),
                );
            } else if path == "pool_id" {
                v.add(field, "pool_id names the pool; it cannot be updated");
            } else {
                v.add(
                    field,
                    format!(
                        "unknown field path {}; known: capacity (or one of its fields, e.g. capacity.gpus_by_model), max_hold",
                        gpualloc_domain::shown(path)
                    ),
                );
            }
        }
        if v.is_empty() {
            Ok(PoolMask::Fields { capacity, max_hold })
        } else {
            Err(v)
        }
    }

    /// The pool after the update; `None` when the mask names fields of a
    /// pool that does not exist.
    pub fn apply(&self, current: Option<&PoolParts>, new: PoolParts) -> Option<PoolParts> {
        match self {
            PoolMask::Replace => Some(new),
            PoolMask::Fields { capacity, max_hold } => {
                let current = current?;
                let pick = |f: CapacityField| capacity.contains(&f);
                let (c, n) = (&current.capacity, &new.capacity);
                Some(PoolParts {
                    capacity: Capacity {
                        cpu_millis: if pick(CapacityField::CpuMillis) {
                            n.cpu_millis
                        } else {
                            c.cpu_millis
                        },
                        memory_mib: if pick(CapacityField::MemoryMib) {
                            n.memory_mib
                        } else {
                            c.memory_mib
                        },
                        storage_gib: if pick(CapacityField::StorageGib) {
                            n.storage_gib
                        } else {
                            c.storage_gib
                        },
                        gpus_by_model: if pick(CapacityField::GpusByModel) {
                            n.gpus_by_model.clone()
                        } else {
                            c.gpus_by_model.clone()
                        },
                        custom: if pick(CapacityField::Custom) {
                            n.custom.clone()
                        } else {
                            c.custom.clone()
                        },
                    },
                    max_hold: if *max_hold {
                        new.max_hold
                    } else {
                        current.max_hold
                    },
                })
            }
        }
    }
}

fn merge_resources(
    current: &Resources,
    new: &Resources,
    fields: &BTreeSet<ResourceField>,
) -> Resources {
    current.merged(new, |f| fields.contains(&f))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use gpualloc_domain::Class;

    use super::*;

    fn paths(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    fn quota(cpu: i64, gpus: i64, storage: i64, hold: Option<i64>) -> QuotaParts {
        QuotaParts {
            limits: Resources::from_lines([
                (&Class::CpuMillis, cpu),
                (&Class::Gpus, gpus),
                (&Class::StorageGib, storage),
            ]),
            approval_above: Resources::from_lines([(&Class::Gpus, 4)]),
            max_hold: hold,
        }
    }

    #[test]
    fn no_mask_empty_mask_and_star_replace_everything() {
        for p in [&[][..], &["*"][..]] {
            let m = QuotaMask::parse(&paths(p)).unwrap();
            assert_eq!(m, QuotaMask::Replace);
            let new = quota(1, 2, 0, None);
            assert_eq!(m.apply(None, new.clone()), Some(new));
        }
        assert_eq!(PoolMask::parse(&[]).unwrap(), PoolMask::Replace);
    }

    #[test]
    fn only_named_fields_change() {
        let current = quota(64_000, 8, 10_000, Some(60));
        // The README's command: raise GPUs, keep storage.
        let m = QuotaMask::parse(&paths(&["limits.gpus"])).unwrap();
        let after = m.apply(Some(&current), quota(0, 16, 0, None)).unwrap();
        assert_eq!(after, quota(64_000, 16, 10_000, Some(60)));
        // A whole message, and max_hold cleared by naming it.
        let m = QuotaMask::parse(&paths(&["limits", "max_hold"])).unwrap();
        let after = m.apply(Some(&current), quota(1, 2, 3, None)).unwrap();
        assert_eq!(after.limits, quota(1, 2, 3, None).limits);
        assert_eq!(after.max_hold, None);
        assert_eq!(after.approval_above, current.approval_above);
    }

    #[test]
    fn a_mask_needs_something_to_update() {
        let m = QuotaMask::parse(&paths(&["max_hold"])).unwrap();
        assert_eq!(m.apply(None, quota(1, 1, 1, None)), None);
        let m = PoolMask::parse(&paths(&["capacity.cpu_millis"])).unwrap();
        let new = PoolParts {
            capacity: Capacity::default(),
            max_hold: None,
        };
        assert_eq!(m.apply(None, new), None);
    }

    #[test]
    fn pool_masks_keep_the_other_classes() {
        let current = PoolParts {
            capacity: Capacity {
                cpu_millis: 128_000,
                storage_gib: 50,
                ..Default::default()
            },
            max_hold: Some(5),
        };
        let mut new = current.clone();
        new.capacity.cpu_millis = 1;
        new.capacity.storage_gib = 99;
        let m = PoolMask::parse(&paths(&["capacity.storage_gib"])).unwrap();
        let after = m.apply(Some(&current), new).unwrap();
        assert_eq!(after.capacity.cpu_millis, 128_000);
        assert_eq!(after.capacity.storage_gib, 99);
        assert_eq!(after.max_hold, Some(5));
    }

    #[test]
    fn bad_paths_are_named_with_what_is_known() {
        let e = QuotaMask::parse(&paths(&["limits.gpu", "limit", "tenant"])).unwrap_err();
        let text: Vec<String> =
            e.0.iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with(
                "update_mask.paths[0]: limits has no field \"gpu\"; known: cpu_millis"
            )
        );
        assert!(text[1].contains("unknown field path \"limit\""));
        assert!(text[2].contains("cannot be updated"));
        let e = PoolMask::parse(&paths(&["usage.cpu_millis", "free"])).unwrap_err();
        assert!(e.0.iter().all(|v| v.description.contains("output only")));
        assert!(QuotaMask::parse(&paths(&["*", "limits"])).is_err());
    }
}
