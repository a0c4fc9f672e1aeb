diesel::table! {
    allocations (allocation_id) {
        allocation_id -> Text,
        tenant -> Text,
        state -> Text,
        reason -> Text,
        resources -> Text,
        pool_id -> Nullable<Text>,
        priority -> Integer,
        request_id -> Nullable<Text>,
        fingerprint -> Text,
        labels -> Text,
        lease_micros -> Nullable<BigInt>,
        version -> BigInt,
        pool_version -> BigInt,
        approved_time -> Nullable<BigInt>,
        create_time -> BigInt,
        update_time -> BigInt,
        expire_time -> Nullable<BigInt>,
        redrives -> Integer,
        redrive_time -> Nullable<BigInt>,
        display_name -> Text,
    }
}

diesel::table! {
    approvals (allocation_id) {
        allocation_id -> Text,
        decision -> Text,
        reason -> Text,
        decided_by -> Text,
        decide_time -> BigInt,
    }
}
