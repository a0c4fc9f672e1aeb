use gpualloc_saga::{Emitter, Event, Handler, Payload};
use gpualloc_storage::DbConnection;

use crate::{Error, ops};

/// Applies the allocation service's saga events: requests and cancels.
#[derive(Debug, Default)]
pub struct AllocationEvents;

impl Handler for AllocationEvents {
    type Error = Error;

    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
    ) -> Result<(), Error> {
        match &event.payload {
            Some(Payload::AllocationRequested(req)) => ops::on_requested(conn, emit, event, req),
            Some(Payload::AllocationCancelled(req)) => ops::on_cancelled(conn, emit, event, req),
            // Not ours (the filter should keep them away); acknowledge.
            _ => Ok(()),
        }
    }
}
