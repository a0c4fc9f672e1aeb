diesel::table! {
    pools (pool_id) {
        pool_id -> Text,
        max_hold_micros -> Nullable<BigInt>,
        version -> BigInt,
        create_time -> BigInt,
        update_time -> BigInt,
    }
}

diesel::table! {
    pool_resources (pool_id, class) {
        pool_id -> Text,
        class -> Text,
        capacity -> BigInt,
        used -> BigInt,
    }
}

diesel::table! {
    tenant_quotas (tenant) {
        tenant -> Text,
        approval_above -> Text,
        max_hold_micros -> Nullable<BigInt>,
        version -> BigInt,
        update_time -> BigInt,
    }
}

diesel::table! {
    tenant_usage (tenant, class) {
        tenant -> Text,
        class -> Text,
        quota_limit -> BigInt,
        charged -> BigInt,
        granted -> BigInt,
    }
}

diesel::table! {
    reservations (allocation_id) {
        allocation_id -> Text,
        tenant -> Text,
        state -> Text,
        demand -> Text,
        pool_id -> Nullable<Text>,
        gpu_model -> Nullable<Text>,
        priority -> Integer,
        request_time -> BigInt,
        lease_micros -> Nullable<BigInt>,
        hold_deadline -> Nullable<BigInt>,
        expire_time -> Nullable<BigInt>,
        reason -> Text,
        outcome -> Nullable<Text>,
        version -> BigInt,
        create_time -> BigInt,
        update_time -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(pools, pool_resources);
