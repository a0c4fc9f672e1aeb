/// A connection to either database. Queries written against it compile once
/// and run on both; code that needs one backend's features matches on the
/// variant.
///
/// The multi-backend supports the common subset of both: no `ON CONFLICT`,
/// no `FOR UPDATE`, no multi-row `INSERT … VALUES` (SQLite's batch insert
/// differs). The code works within that subset: existence checks under
/// unique constraints, lock rows ([`crate::lock`]), and row-by-row inserts.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgresql(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}
