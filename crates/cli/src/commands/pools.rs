//! `gpualloc pools …`: capacity, used and free per class, with a bar per
//! GPU model (like `sinfo`); put and delete for administrators.

use clap::{Args, Subcommand};
use gpualloc_proto::resourcepool::v1 as rp;

use crate::{
    connect::Session,
    exit::Failure,
    input,
    output::{self, bar},
};

#[derive(Debug, Subcommand)]
pub enum Pools {
    /// Every pool, or those with a GPU model.
    #[command(
        after_help = "Examples:\n  gpualloc pools list\n  gpualloc pools list --model A100 -o wide"
    )]
    List {
        /// Only pools with this GPU model.
        #[arg(long, default_value = "")]
        model: String,
    },
    /// One pool.
    #[command(after_help = "Example: gpualloc pools get gpu-a100")]
    Get { pool: String },
    /// Create a pool or change its capacity (admin); with any capacity flag
    /// given, only what is given changes.
    #[command(
        after_help = "Examples:\n  gpualloc --context local-admin pools put lab --gpus A100=4 --cpu 64 --memory 256Gi\n  \
                            gpualloc --context local-admin pools put hall-a --custom SEAT=200"
    )]
    Put(Put),
    /// Delete an empty pool (admin).
    #[command(after_help = "Example: gpualloc --context local-admin pools delete lab")]
    Delete { pool: String },
}

#[derive(Debug, Args)]
pub struct Put {
    #[command(flatten)]
    pub amounts: super::Amounts,
    pub pool: String,
    /// GPUs of a model: MODEL=COUNT (repeatable).
    #[arg(long = "gpus", value_parser = input::custom)]
    pub gpus: Vec<(String, i64)>,
    /// Replace the whole capacity (classes not given become 0).
    #[arg(long)]
    pub replace: bool,
}

pub async fn run(session: &Session, cmd: Pools) -> Result<(), Failure> {
    let mut client = session.pools.clone();
    let p = &session.print;
    match cmd {
        Pools::List { model } => {
            let r = client
                .list_pools(rp::ListPoolsRequest { gpu_model: model })
                .await?
                .into_inner();
            if p.raw() {
                return p.message(&r);
            }
            table(session, &r.pools);
            Ok(())
        }
        Pools::Get { pool } => {
            let r = client
                .get_pool(rp::GetPoolRequest { pool_id: pool })
                .await?
                .into_inner();
            if p.raw() {
                return p.message(&r);
            }
            table(session, std::slice::from_ref(&r));
            Ok(())
        }
        Pools::Put(put) => {
            let mut paths = Vec::new();
            if put.amounts.cpu.is_some() {
                paths.push("capacity.cpu_millis".to_owned());
            }
            if put.amounts.memory.is_some() {
                paths.push("capacity.memory_mib".to_owned());
            }
            if put.amounts.storage.is_some() {
                paths.push("capacity.storage_gib".to_owned());
            }
            // A mask names a map whole: the models and classes given are
            // merged into what the pool has, the others kept.
            let existing = client
                .get_pool(rp::GetPoolRequest {
                    pool_id: put.pool.clone(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().capacity);
            let mut gpus_by_model = existing
                .as_ref()
                .map(|c| c.gpus_by_model.clone())
                .unwrap_or_default();
            let mut custom = existing
                .as_ref()
                .map(|c| c.custom.clone())
                .unwrap_or_default();
            if put.replace {
                gpus_by_model.clear();
                custom.clear();
            }
            for (m, n) in &put.gpus {
                gpus_by_model.insert(m.clone(), i32::try_from(*n).unwrap_or(i32::MAX));
            }
            for (c, n) in &put.amounts.custom {
                custom.insert(c.clone(), *n);
            }
            if !put.gpus.is_empty() {
                paths.push("capacity.gpus_by_model".to_owned());
            }
            if !put.amounts.custom.is_empty() {
                paths.push("capacity.custom".to_owned());
            }
            let capacity = rp::Capacity {
                cpu_millis: put.amounts.cpu.unwrap_or(0),
                memory_mib: put.amounts.memory.unwrap_or(0),
                storage_gib: put.amounts.storage.unwrap_or(0),
                gpus_by_model,
                custom,
            };
            // An existing pool changes only what was given; a new one (or
            // --replace) takes the capacity as given.
            let exists = existing.is_some();
            let update_mask = (exists && !put.replace && !paths.is_empty())
                .then_some(prost_types::FieldMask { paths });
            let r = client
                .put_pool(rp::PutPoolRequest {
                    pool: Some(rp::Pool {
                        pool_id: put.pool,
                        capacity: Some(capacity),
                        ..Default::default()
                    }),
                    update_mask,
                })
                .await?
                .into_inner();
            if p.raw() {
                return p.message(&r);
            }
            table(session, std::slice::from_ref(&r));
            Ok(())
        }
        Pools::Delete { pool } => {
            let r = client
                .delete_pool(rp::DeletePoolRequest {
                    pool_id: pool.clone(),
                })
                .await?
                .into_inner();
            if p.raw() {
                return p.message(&r);
            }
            output::out(&format!("pool {pool} deleted\n"));
            Ok(())
        }
    }
}

/// One row per pool and class: capacity, used, free, and a bar.
fn table(session: &Session, pools: &[rp::Pool]) {
    let p = &session.print;
    let mut rows = Vec::new();
    for pool in pools {
        let cap = pool.capacity.clone().unwrap_or_default();
        let used = pool.usage.clone().unwrap_or_default();
        let free = pool.free.clone().unwrap_or_default();
        let mut classes: Vec<(String, i64, i64, i64)> = Vec::new();
        let mut models: Vec<_> = cap.gpus_by_model.iter().collect();
        models.sort();
        for (m, n) in models {
            classes.push((
                format!("gpu {m}"),
                i64::from(*n),
                i64::from(used.gpus_by_model.get(m).copied().unwrap_or(0)),
                i64::from(free.gpus_by_model.get(m).copied().unwrap_or(0)),
            ));
        }
        if cap.cpu_millis > 0 {
            classes.push((
                "cpu (cores)".into(),
                cap.cpu_millis / 1000,
                used.cpu_millis / 1000,
                free.cpu_millis / 1000,
            ));
        }
        if cap.memory_mib > 0 {
            classes.push((
                "memory (Gi)".into(),
                cap.memory_mib / 1024,
                used.memory_mib / 1024,
                free.memory_mib / 1024,
            ));
        }
        if cap.storage_gib > 0 {
            classes.push((
                "storage (Gi)".into(),
                cap.storage_gib,
                used.storage_gib,
                free.storage_gib,
            ));
        }
        let mut custom: Vec<_> = cap.custom.iter().collect();
        custom.sort();
        for (c, n) in custom {
            classes.push((
                c.clone(),
                *n,
                used.custom.get(c).copied().unwrap_or(0),
                free.custom.get(c).copied().unwrap_or(0),
            ));
        }
        if classes.is_empty() {
            rows.push(vec![
                pool.pool_id.clone(),
                "-".into(),
                "0".into(),
                "0".into(),
                "0".into(),
                String::new(),
            ]);
        }
        for (i, (class, cap, used, free)) in classes.into_iter().enumerate() {
            let name = if i == 0 || p.wide() {
                pool.pool_id.clone()
            } else {
                String::new()
            };
            rows.push(vec![
                name,
                class,
                cap.to_string(),
                used.to_string(),
                free.to_string(),
                bar(used, cap, 10),
            ]);
        }
    }
    p.table(&["POOL", "CLASS", "CAPACITY", "USED", "FREE", "USE"], &rows);
}
