//! A fresh database per test: a SQLite file in a temporary folder, or a
//! new PostgreSQL database (on the shared test server or one a test
//! started), dropped with the value.

use diesel::{Connection, PgConnection, RunQueryDsl, sql_query};

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("GPUALLOC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty database, dropped with the value.
pub struct TestDb {
    pub url: String,
    postgres: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A SQLite file in a temporary folder.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        TestDb {
            url,
            postgres: None,
            _dir: Some(dir),
        }
    }

    /// A new database on the test PostgreSQL server.
    pub fn postgres() -> TestDb {
        Self::postgres_on(&postgres_admin_url())
    }

    /// A new database on the server at `admin` (a URL of a user who may
    /// create databases).
    pub fn postgres_on(admin: &str) -> TestDb {
        let admin = admin.to_owned();
        let name = crate::unique_name("gpualloc_t_");
        let mut conn = PgConnection::establish(&admin).unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} is not reachable ({e}); run the tests with `cargo xtask test` or set GPUALLOC_TEST_DATABASE_URL")
        });
        sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
        let url = with_database(&admin, &name);
        TestDb {
            url,
            postgres: Some((admin, name)),
            _dir: None,
        }
    }

    /// Another database on the same server (or folder): for tests that run
    /// several services against one backend.
    pub fn sibling(&self) -> TestDb {
        match &self.postgres {
            Some((admin, _)) => TestDb::postgres_on(admin),
            None => TestDb::sqlite(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres.is_some()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.postgres
            && let Ok(mut conn) = PgConnection::establish(admin)
        {
            let _ = sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn);
        }
    }
}

/// Replaces the database name of a PostgreSQL URL.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            super::with_database("postgres://u@h:5/postgres?sslmode=disable", "x"),
            "postgres://u@h:5/x?sslmode=disable"
        );
        assert_eq!(
            super::with_database("postgres://u@h", "x"),
            "postgres://u@h/x"
        );
    }
}
