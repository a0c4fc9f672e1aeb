diesel::table! {
    allocation_views (allocation_id) {
        allocation_id -> Text,
        tenant -> Text,
        state -> Text,
        version -> BigInt,
        create_time -> BigInt,
        update_time -> BigInt,
        hold_position -> BigInt,
        snapshot -> Binary,
        project_time -> BigInt,
        expire_time -> Nullable<BigInt>,
    }
}

diesel::table! {
    allocation_history (allocation_id, version) {
        allocation_id -> Text,
        version -> BigInt,
        event_id -> Text,
        tenant -> Text,
        previous_state -> Text,
        state -> Text,
        reason -> Text,
        change_time -> BigInt,
        snapshot -> Binary,
        project_time -> BigInt,
        actor -> Text,
    }
}

diesel::table! {
    tenant_quota_views (tenant) {
        tenant -> Text,
        limits -> Text,
        version -> BigInt,
    }
}

diesel::table! {
    notifications (id) {
        id -> BigInt,
        dedupe_key -> Text,
        channel -> Text,
        tenant -> Text,
        allocation_id -> Text,
        kind -> Text,
        body -> Text,
        status -> Text,
        attempts -> Integer,
        next_attempt -> BigInt,
        last_error -> Text,
        create_time -> BigInt,
        deliver_time -> Nullable<BigInt>,
    }
}
