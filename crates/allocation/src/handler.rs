use gpualloc_saga::{Emitter, Event, Handler};
use gpualloc_storage::DbConnection;

use crate::{Error, ops};

/// Applies the resource pool's decisions to the allocation state machine.
#[derive(Debug, Default)]
pub struct PoolDecisions;

impl Handler for PoolDecisions {
    type Error = Error;

    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
    ) -> Result<(), Error> {
        ops::on_pool_event(conn, emit, event)
    }
}
