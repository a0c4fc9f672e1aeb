use gpualloc_saga::{Delivery, Emitter, Event, Handler, Outcome};
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
        delivery: Delivery,
    ) -> Result<Outcome, Error> {
        ops::on_pool_event(conn, emit, event, delivery)
    }
}
