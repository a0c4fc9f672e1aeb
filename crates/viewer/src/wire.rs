//! Where the viewer's two contracts meet: it stores allocations as the
//! events carry them (`gpualloc.events.v1.AllocationSnapshot`) and serves
//! them as the API's `gpualloc.allocation.v1.Allocation`. Field by field,
//! so that a change to either contract is a change here, not a silent
//! change of the other.

use gpualloc_proto::{allocation::v1 as apb, events::v1 as ev, resourcepool::v1 as rp};

/// The API's allocation from a stored or received snapshot.
pub fn allocation(s: ev::AllocationSnapshot) -> apb::Allocation {
    apb::Allocation {
        allocation_id: s.allocation_id,
        tenant: s.tenant,
        resources: s.resources.map(resources),
        state: gpualloc_domain::State::from_event(s.state)
            .map_or(apb::State::Unspecified, |st| st.to_proto()) as i32,
        reason: s.reason,
        pool: s.pool,
        priority: s.priority,
        request_id: s.request_id,
        labels: s.labels,
        version: s.version,
        create_time: s.create_time,
        update_time: s.update_time,
        expire_time: s.expire_time,
        lease: s.lease,
        display_name: s.display_name,
        end_time: s.end_time,
    }
}

/// The API's resources from the events' (what was stored was checked when
/// it was projected; this copies, it does not judge).
pub fn resources(r: ev::Resources) -> rp::Resources {
    rp::Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
        gpu_model: r.gpu_model,
        storage_gib: r.storage_gib,
        custom: r.custom,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use prost::Message;

    use super::*;

    /// Snapshots stored before the events had a contract of their own were
    /// the API's `Allocation`; they must still be served as they were.
    #[test]
    fn a_snapshot_stored_as_the_api_message_reads_back_the_same() {
        let before = apb::Allocation {
            allocation_id: "0190e0c2-8f0a-7cc0-9b1d-2f3e4a5b6c7d".into(),
            tenant: "team-a".into(),
            resources: Some(rp::Resources {
                cpu_millis: 1500,
                gpus: 2,
                gpu_model: "A100".into(),
                custom: [("seat".to_owned(), 3)].into(),
                ..Default::default()
            }),
            state: apb::State::Allocated as i32,
            reason: "granted on pool p".into(),
            pool: "p".into(),
            priority: 7,
            request_id: "r".into(),
            labels: [("team".to_owned(), "a".to_owned())].into(),
            version: 3,
            create_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            update_time: Some(prost_types::Timestamp {
                seconds: 2,
                nanos: 0,
            }),
            expire_time: Some(prost_types::Timestamp {
                seconds: 3,
                nanos: 0,
            }),
            lease: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            display_name: "run 7".into(),
            end_time: None,
        };
        let stored = before.encode_to_vec();
        let read = allocation(ev::AllocationSnapshot::decode(stored.as_slice()).unwrap());
        assert_eq!(read, before);
    }
}
