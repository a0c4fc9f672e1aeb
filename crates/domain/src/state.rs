//! The allocation state machine: its states, the only transitions that
//! exist, and their names on the wire and in the databases.

use std::fmt;

use gpualloc_proto::{allocation::v1 as pb, events::v1 as ev};

/// The allocation state machine. Only the transitions in
/// [`State::can_move_to`] exist; everything else is a no-op, which is what
/// makes duplicate and re-ordered events harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Pending,
    AwaitingApproval,
    Held,
    Allocated,
    Rejected,
    Cancelling,
    Cancelled,
    Expired,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Pending,
        State::AwaitingApproval,
        State::Held,
        State::Allocated,
        State::Rejected,
        State::Cancelling,
        State::Cancelled,
        State::Expired,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Rejected | State::Cancelled | State::Expired)
    }

    /// Terminal or steady: what the saga converges to when no one acts.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || matches!(self, State::Allocated | State::Held)
    }

    pub fn can_move_to(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (AwaitingApproval, Pending | Rejected | Cancelled)
                | (
                    Pending,
                    Allocated | Held | Rejected | Cancelling | AwaitingApproval
                )
                | (Held, Allocated | Rejected | Cancelling)
                | (Allocated, Cancelling | Expired)
                | (Cancelling, Cancelled | Expired | Rejected)
        )
    }

    /// The name stored in databases (and shown in logs).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::AwaitingApproval => "AWAITING_APPROVAL",
            State::Held => "HELD",
            State::Allocated => "ALLOCATED",
            State::Rejected => "REJECTED",
            State::Cancelling => "CANCELLING",
            State::Cancelled => "CANCELLED",
            State::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn from_proto(v: i32) -> Option<State> {
        Some(match pb::State::try_from(v).ok()? {
            pb::State::Unspecified => return None,
            pb::State::Pending => State::Pending,
            pb::State::AwaitingApproval => State::AwaitingApproval,
            pb::State::Held => State::Held,
            pb::State::Allocated => State::Allocated,
            pb::State::Rejected => State::Rejected,
            pb::State::Cancelling => State::Cancelling,
            pb::State::Cancelled => State::Cancelled,
            pb::State::Expired => State::Expired,
        })
    }

    pub fn to_proto(self) -> pb::State {
        match self {
            State::Pending => pb::State::Pending,
            State::AwaitingApproval => pb::State::AwaitingApproval,
            State::Held => pb::State::Held,
            State::Allocated => pb::State::Allocated,
            State::Rejected => pb::State::Rejected,
            State::Cancelling => pb::State::Cancelling,
            State::Cancelled => pb::State::Cancelled,
            State::Expired => pb::State::Expired,
        }
    }
}

impl State {
    /// The state as events carry it.
    pub fn from_event(v: i32) -> Option<State> {
        Some(match ev::AllocationState::try_from(v).ok()? {
            ev::AllocationState::Unspecified => return None,
            ev::AllocationState::Pending => State::Pending,
            ev::AllocationState::AwaitingApproval => State::AwaitingApproval,
            ev::AllocationState::Held => State::Held,
            ev::AllocationState::Allocated => State::Allocated,
            ev::AllocationState::Rejected => State::Rejected,
            ev::AllocationState::Cancelling => State::Cancelling,
            ev::AllocationState::Cancelled => State::Cancelled,
            ev::AllocationState::Expired => State::Expired,
        })
    }

    pub fn to_event(self) -> ev::AllocationState {
        match self {
            State::Pending => ev::AllocationState::Pending,
            State::AwaitingApproval => ev::AllocationState::AwaitingApproval,
            State::Held => ev::AllocationState::Held,
            State::Allocated => ev::AllocationState::Allocated,
            State::Rejected => ev::AllocationState::Rejected,
            State::Cancelling => ev::AllocationState::Cancelling,
            State::Cancelled => ev::AllocationState::Cancelled,
            State::Expired => ev::AllocationState::Expired,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_are_final() {
        for from in State::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in State::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn granted_and_released_cannot_loop() {
        // Once released (cancelled/expired) nothing leads back to ALLOCATED,
        // and ALLOCATED never goes back to a waiting state.
        assert!(!State::Allocated.can_move_to(State::Held));
        assert!(!State::Allocated.can_move_to(State::Pending));
        assert!(!State::Cancelling.can_move_to(State::Allocated));
    }

    #[test]
    fn names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(State::from_proto(s.to_proto() as i32), Some(s));
            assert_eq!(State::from_event(s.to_event() as i32), Some(s));
        }
        assert_eq!(State::from_proto(0), None);
        assert_eq!(State::from_proto(99), None);
    }
}
