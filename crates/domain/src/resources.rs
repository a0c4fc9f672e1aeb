//! Amounts of resources as the domain counts them: accounting `Class`es
//! (cpu, memory, storage, GPUs by model, custom classes) and `Resources`
//! bundles with their limits, arithmetic that cannot overflow, and parsing
//! from the wire form, so that nothing below the gRPC edge sees an
//! unchecked amount.

use std::{collections::BTreeMap, fmt, str::FromStr};

use gpualloc_proto::{events::v1 as ev, resourcepool::v1 as pb};
use serde::{Deserialize, Serialize};

use crate::{CustomClass, GpuModel, Violations};

/// Largest amount of any class. Keeps every sum of amounts far from `i64`
/// overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// One accounting class: a counter that capacity, quota and usage are kept
/// in. Its string form is what the databases store and what
/// `QuotaViolation.resource_class` reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    CpuMillis,
    MemoryMib,
    StorageGib,
    /// GPUs of any model: the unit of tenant quotas.
    Gpus,
    /// GPUs of one model: the unit of pool capacity.
    GpusOf(GpuModel),
    Custom(CustomClass),
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Class::CpuMillis => f.write_str("cpu_millis"),
            Class::MemoryMib => f.write_str("memory_mib"),
            Class::StorageGib => f.write_str("storage_gib"),
            Class::Gpus => f.write_str("gpus"),
            Class::GpusOf(m) => write!(f, "gpus.{m}"),
            Class::Custom(c) => write!(f, "custom.{c}"),
        }
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "cpu_millis" => Class::CpuMillis,
            "memory_mib" => Class::MemoryMib,
            "storage_gib" => Class::StorageGib,
            "gpus" => Class::Gpus,
            _ => {
                if let Some(m) = s.strip_prefix("gpus.") {
                    Class::GpusOf(GpuModel::parse(m)?)
                } else if let Some(c) = s.strip_prefix("custom.") {
                    Class::Custom(CustomClass::parse(c)?)
                } else {
                    return Err(format!("unknown resource class {}", crate::shown(s)));
                }
            }
        })
    }
}

fn amount(v: i64) -> Result<i64, String> {
    if v < 0 {
        Err(format!("must not be negative (got {v})"))
    } else if v > MAX_AMOUNT {
        Err(format!("must be at most {MAX_AMOUNT} (got {v})"))
    } else {
        Ok(v)
    }
}

/// Most custom classes one bundle may name: every class is a row, a
/// counter and bytes in each event, so a tenant must not be able to make
/// an event larger than the broker takes.
pub const MAX_CUSTOM_CLASSES: usize = 64;

fn custom_map(raw: BTreeMap<String, i64>, v: &mut Violations) -> BTreeMap<CustomClass, i64> {
    let mut out = BTreeMap::new();
    if raw.len() > MAX_CUSTOM_CLASSES {
        v.add(
            "custom",
            format!(
                "at most {MAX_CUSTOM_CLASSES} custom classes (got {})",
                raw.len()
            ),
        );
        return out;
    }
    for (name, value) in raw {
        let field = if name.chars().count() > 64 {
            "custom[…]".to_owned()
        } else {
            format!("custom[{name}]")
        };
        let class = v.check(&field, CustomClass::parse(name));
        let value = v.check(&field, amount(value));
        if let (Some(class), Some(value)) = (class, value)
            && value > 0
        {
            out.insert(class, value);
        }
    }
    out
}

/// A bundle of resources: a request, a quota limit or a usage figure.
/// Zero-valued custom classes are dropped, so equal bundles compare equal.
/// The fields are private: a bundle comes from the parser (`TryFrom` a
/// wire message), from counters ([`Resources::from_lines`]) or from the
/// database it was stored in after parsing, so every amount in one is in
/// range and a model never comes without GPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    cpu_millis: i64,
    memory_mib: i64,
    gpus: i64,
    /// `None` means any model.
    gpu_model: Option<GpuModel>,
    storage_gib: i64,
    custom: BTreeMap<CustomClass, i64>,
}

/// The countable fields of a bundle, as a partial update names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResourceField {
    CpuMillis,
    MemoryMib,
    Gpus,
    StorageGib,
    Custom,
}

/// Resources travel in two contracts with the same shape — the API's
/// `gpualloc.resourcepool.v1.Resources` and the events'
/// `gpualloc.events.v1.Resources` — and convert the same way from both.
macro_rules! resources_message {
    ($msg:ty) => {
        /// Shape checks every bundle passes: amounts in range, names valid, and a
        /// model only together with GPUs. Whether the bundle may be empty or carry
        /// a model depends on its use; see [`Resources::parse_request`] and
        /// [`Resources::parse_limits`].
        impl TryFrom<$msg> for Resources {
            type Error = Violations;

            fn try_from(p: $msg) -> Result<Self, Violations> {
                let mut v = Violations::new();
                let cpu_millis = v.check("cpu_millis", amount(p.cpu_millis));
                let memory_mib = v.check("memory_mib", amount(p.memory_mib));
                let gpus = v.check("gpus", amount(i64::from(p.gpus)));
                let storage_gib = v.check("storage_gib", amount(p.storage_gib));
                let gpu_model = if p.gpu_model.is_empty() {
                    None
                } else {
                    v.check("gpu_model", GpuModel::parse(p.gpu_model))
                };
                if gpu_model.is_some() && p.gpus == 0 {
                    v.add("gpu_model", "a GPU model needs gpus > 0");
                }
                let custom = custom_map(p.custom, &mut v);
                v.into_result(|| Resources {
                    cpu_millis: cpu_millis.unwrap_or_default(),
                    memory_mib: memory_mib.unwrap_or_default(),
                    gpus: gpus.unwrap_or_default(),
                    gpu_model,
                    storage_gib: storage_gib.unwrap_or_default(),
                    custom,
                })
            }
        }
    };
}

impl Resources {
    /// Parses what a tenant asks for: it must ask for something.
    pub fn parse_request(p: Option<pb::Resources>) -> Result<Self, Violations> {
        let Some(p) = p else {
            return Err(Violations::single("", "resources are required"));
        };
        let r = Resources::try_from(p)?;
        if r.is_empty() {
            return Err(Violations::single(
                "",
                "ask for at least one unit of some resource",
            ));
        }
        Ok(r)
    }

    /// Parses a quota limit or threshold: may be empty, must not name a model
    /// (quota counts GPUs of every model together).
    pub fn parse_limits(p: Option<pb::Resources>) -> Result<Self, Violations> {
        let r = Resources::try_from(p.unwrap_or_default())?;
        if r.gpu_model.is_some() {
            return Err(Violations::single(
                "gpu_model",
                "quota counts GPUs of every model; leave gpu_model empty",
            ));
        }
        Ok(r)
    }

    pub fn cpu_millis(&self) -> i64 {
        self.cpu_millis
    }

    pub fn memory_mib(&self) -> i64 {
        self.memory_mib
    }

    pub fn gpus(&self) -> i64 {
        self.gpus
    }

    /// `None` means any model.
    pub fn gpu_model(&self) -> Option<&GpuModel> {
        self.gpu_model.as_ref()
    }

    pub fn storage_gib(&self) -> i64 {
        self.storage_gib
    }

    pub fn custom(&self) -> &BTreeMap<CustomClass, i64> {
        &self.custom
    }

    /// Records the model a grant chose when any model was acceptable (a
    /// bundle that names one keeps it).
    pub fn fill_model(&mut self, granted: Option<GpuModel>) {
        if self.gpu_model.is_none() && self.gpus > 0 {
            self.gpu_model = granted;
        }
    }

    /// `new`'s amounts for the fields `pick` names and this bundle's for
    /// the rest: a partial update. The model goes with the GPUs.
    pub fn merged(&self, new: &Resources, pick: impl Fn(ResourceField) -> bool) -> Resources {
        let from = |f: ResourceField| if pick(f) { new } else { self };
        Resources {
            cpu_millis: from(ResourceField::CpuMillis).cpu_millis,
            memory_mib: from(ResourceField::MemoryMib).memory_mib,
            gpus: from(ResourceField::Gpus).gpus,
            gpu_model: from(ResourceField::Gpus).gpu_model.clone(),
            storage_gib: from(ResourceField::StorageGib).storage_gib,
            custom: from(ResourceField::Custom).custom.clone(),
        }
    }

    /// The sum of two bundles, saturating (the amounts may come from
    /// events; a sum must not overflow inside a read). A sum of GPUs has
    /// no single model.
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        let mut custom = self.custom.clone();
        for (c, v) in &other.custom {
            let sum = custom.entry(c.clone()).or_default();
            *sum = sum.saturating_add(*v);
        }
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            gpus: self.gpus.saturating_add(other.gpus),
            gpu_model: None,
            storage_gib: self.storage_gib.saturating_add(other.storage_gib),
            custom,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cpu_millis == 0
            && self.memory_mib == 0
            && self.gpus == 0
            && self.storage_gib == 0
            && self.custom.is_empty()
    }

    /// The bundle in quota classes (GPUs of any model counted together),
    /// zero classes left out.
    pub fn quota_lines(&self) -> Vec<(Class, i64)> {
        self.lines(Class::Gpus)
    }

    /// The bundle in pool classes, with its GPUs counted as `model`.
    pub fn pool_lines(&self, model: Option<&GpuModel>) -> Vec<(Class, i64)> {
        match model {
            Some(m) => self.lines(Class::GpusOf(m.clone())),
            None => self.lines(Class::Gpus),
        }
    }

    fn lines(&self, gpu_class: Class) -> Vec<(Class, i64)> {
        let mut out = Vec::new();
        for (class, v) in [
            (Class::CpuMillis, self.cpu_millis),
            (Class::MemoryMib, self.memory_mib),
            (gpu_class, self.gpus),
            (Class::StorageGib, self.storage_gib),
        ] {
            if v > 0 {
                out.push((class, v));
            }
        }
        out.extend(
            self.custom
                .iter()
                .map(|(c, v)| (Class::Custom(c.clone()), *v)),
        );
        out
    }

    /// Rebuilds a bundle from quota-class counters (the inverse of
    /// [`Resources::quota_lines`]); per-model GPU counters add up to `gpus`.
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = (&'a Class, i64)>) -> Self {
        let mut r = Resources::default();
        for (class, v) in lines {
            match class {
                Class::CpuMillis => r.cpu_millis = r.cpu_millis.saturating_add(v),
                Class::MemoryMib => r.memory_mib = r.memory_mib.saturating_add(v),
                Class::StorageGib => r.storage_gib = r.storage_gib.saturating_add(v),
                Class::Gpus | Class::GpusOf(_) => r.gpus = r.gpus.saturating_add(v),
                Class::Custom(c) => {
                    if v != 0 {
                        let sum = r.custom.entry(c.clone()).or_default();
                        *sum = sum.saturating_add(v);
                    }
                }
            }
        }
        r
    }

    /// Classes in which `self` is above `threshold`, where a threshold of 0
    /// means "no threshold" (the meaning of `approval_above`).
    pub fn above_threshold(&self, threshold: &Resources) -> Vec<Class> {
        let limits: BTreeMap<Class, i64> = threshold.quota_lines().into_iter().collect();
        self.quota_lines()
            .into_iter()
            .filter(|(class, v)| limits.get(class).is_some_and(|limit| v > limit))
            .map(|(class, _)| class)
            .collect()
    }
}

macro_rules! resources_from_domain {
    ($msg:ty) => {
        impl From<&Resources> for $msg {
            fn from(r: &Resources) -> Self {
                Self {
                    cpu_millis: r.cpu_millis,
                    memory_mib: r.memory_mib,
                    gpus: i32::try_from(r.gpus).unwrap_or(i32::MAX),
                    gpu_model: r
                        .gpu_model
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                    storage_gib: r.storage_gib,
                    custom: r.custom.iter().map(|(c, v)| (c.to_string(), *v)).collect(),
                }
            }
        }
    };
}

resources_message!(pb::Resources);
resources_message!(ev::Resources);
resources_from_domain!(pb::Resources);
resources_from_domain!(ev::Resources);

/// What a pool holds (capacity) or has granted (usage).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu_millis: i64,
    pub memory_mib: i64,
    pub storage_gib: i64,
    pub gpus_by_model: BTreeMap<GpuModel, i64>,
    pub custom: BTreeMap<CustomClass, i64>,
}

impl TryFrom<pb::Capacity> for Capacity {
    type Error = Violations;

    fn try_from(p: pb::Capacity) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let cpu_millis = v.check("cpu_millis", amount(p.cpu_millis));
        let memory_mib = v.check("memory_mib", amount(p.memory_mib));
        let storage_gib = v.check("storage_gib", amount(p.storage_gib));
        let mut gpus_by_model = BTreeMap::new();
        if p.gpus_by_model.len() > MAX_CUSTOM_CLASSES {
            v.add(
                "gpus_by_model",
                format!(
                    "at most {MAX_CUSTOM_CLASSES} GPU models (got {})",
                    p.gpus_by_model.len()
                ),
            );
        }
        for (model, n) in p.gpus_by_model.into_iter().take(MAX_CUSTOM_CLASSES) {
            let field = if model.chars().count() > 64 {
                "gpus_by_model[…]".to_owned()
            } else {
                format!("gpus_by_model[{model}]")
            };
            let model = v.check(&field, GpuModel::parse(model));
            let n = v.check(&field, amount(i64::from(n)));
            if let (Some(model), Some(n)) = (model, n)
                && n > 0
            {
                gpus_by_model.insert(model, n);
            }
        }
        let custom = custom_map(p.custom, &mut v);
        v.into_result(|| Capacity {
            cpu_millis: cpu_millis.unwrap_or_default(),
            memory_mib: memory_mib.unwrap_or_default(),
            storage_gib: storage_gib.unwrap_or_default(),
            gpus_by_model,
            custom,
        })
    }
}

impl Capacity {
    /// Every non-zero class of the pool.
    pub fn lines(&self) -> Vec<(Class, i64)> {
        let mut out = Vec::new();
        for (class, v) in [
            (Class::CpuMillis, self.cpu_millis),
            (Class::MemoryMib, self.memory_mib),
            (Class::StorageGib, self.storage_gib),
        ] {
            if v > 0 {
                out.push((class, v));
            }
        }
        out.extend(
            self.gpus_by_model
                .iter()
                .map(|(m, v)| (Class::GpusOf(m.clone()), *v)),
        );
        out.extend(
            self.custom
                .iter()
                .map(|(c, v)| (Class::Custom(c.clone()), *v)),
        );
        out
    }

    pub fn from_lines<'a>(lines: impl IntoIterator<Item = (&'a Class, i64)>) -> Self {
        let mut c = Capacity::default();
        for (class, v) in lines {
            if v == 0 {
                continue;
            }
            match class {
                Class::CpuMillis => c.cpu_millis = c.cpu_millis.saturating_add(v),
                Class::MemoryMib => c.memory_mib = c.memory_mib.saturating_add(v),
                Class::StorageGib => c.storage_gib = c.storage_gib.saturating_add(v),
                // Pools never count GPUs without a model.
                Class::Gpus => {}
                Class::GpusOf(m) => {
                    let n = c.gpus_by_model.entry(m.clone()).or_default();
                    *n = n.saturating_add(v);
                }
                Class::Custom(name) => {
                    let n = c.custom.entry(name.clone()).or_default();
                    *n = n.saturating_add(v);
                }
            }
        }
        c
    }
}

/// Capacity, too, is in both contracts (a pool's snapshot in
/// `PoolChanged`).
macro_rules! capacity_from_domain {
    ($msg:ty) => {
        impl From<&Capacity> for $msg {
            fn from(c: &Capacity) -> Self {
                Self {
                    cpu_millis: c.cpu_millis,
                    memory_mib: c.memory_mib,
                    storage_gib: c.storage_gib,
                    gpus_by_model: c
                        .gpus_by_model
                        .iter()
                        .map(|(m, v)| (m.to_string(), i32::try_from(*v).unwrap_or(i32::MAX)))
                        .collect(),
                    custom: c.custom.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                }
            }
        }
    };
}

capacity_from_domain!(pb::Capacity);
capacity_from_domain!(ev::Capacity);

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: i64, gpus: i32, model: &str) -> pb::Resources {
        pb::Resources {
            cpu_millis: cpu,
            gpus,
            gpu_model: model.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_grant_fills_in_the_model_only_where_any_was_acceptable() {
        let a100 = GpuModel::parse("A100").ok();
        let mut any = Resources::try_from(req(0, 2, "")).unwrap();
        any.fill_model(a100.clone());
        assert_eq!(any.gpu_model(), a100.as_ref());
        let mut named = Resources::try_from(req(0, 2, "H100")).unwrap();
        named.fill_model(a100);
        assert_eq!(named.gpu_model().map(|m| m.as_str()), Some("H100"));
    }

    #[test]
    fn a_partial_update_takes_only_the_named_fields_and_sums_saturate() {
        let current = Resources::try_from(req(1000, 4, "")).unwrap();
        let new = Resources::try_from(req(9000, 8, "")).unwrap();
        let merged = current.merged(&new, |f| f == ResourceField::Gpus);
        assert_eq!((merged.cpu_millis(), merged.gpus()), (1000, 8));
        let big = Resources::from_lines([(&Class::CpuMillis, i64::MAX)]);
        assert_eq!(big.saturating_add(&current).cpu_millis(), i64::MAX);
        assert_eq!(current.saturating_add(&new).gpus(), 12);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let mut p = req(-1, -2, "bad model");
        p.custom.insert("9x".into(), -3);
        let err = Resources::try_from(p).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "cpu_millis",
                "gpus",
                "gpu_model",
                "custom[9x]",
                "custom[9x]"
            ]
        );
    }

    #[test]
    fn a_model_needs_gpus_and_a_request_needs_something() {
        assert!(Resources::try_from(req(1, 0, "A100")).is_err());
        assert!(Resources::parse_request(Some(req(0, 0, ""))).is_err());
        assert!(Resources::parse_request(None).is_err());
        assert!(Resources::parse_limits(Some(req(0, 4, "A100"))).is_err());
        assert!(Resources::parse_limits(None).is_ok());
    }

    #[test]
    fn amounts_are_bounded() {
        assert!(Resources::try_from(req(MAX_AMOUNT, 0, "")).is_ok());
        assert!(Resources::try_from(req(MAX_AMOUNT + 1, 0, "")).is_err());
    }

    #[test]
    fn classes_round_trip_through_strings() {
        let r = Resources {
            cpu_millis: 1,
            gpus: 2,
            gpu_model: Some(GpuModel::parse("A100").unwrap()),
            custom: [(CustomClass::parse("SEAT").unwrap(), 3)].into(),
            ..Default::default()
        };
        for (class, _) in r.pool_lines(r.gpu_model.as_ref()) {
            assert_eq!(class.to_string().parse::<Class>(), Ok(class));
        }
        let quota = r.quota_lines();
        let back = Resources::from_lines(quota.iter().map(|(c, v)| (c, *v)));
        assert_eq!(back.gpus, 2);
        assert_eq!(back.custom, r.custom);
    }

    #[test]
    fn zero_threshold_means_no_threshold() {
        let r = Resources::try_from(req(5000, 8, "")).unwrap();
        let t = Resources::try_from(req(0, 4, "")).unwrap();
        assert_eq!(r.above_threshold(&t), vec![Class::Gpus]);
        assert!(r.above_threshold(&Resources::default()).is_empty());
    }
}
