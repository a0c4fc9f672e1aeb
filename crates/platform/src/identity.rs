//! Who is calling. Inside the mesh, Istio's RequestAuthentication verifies
//! the caller's JWT and copies its claims into `x-gpualloc-tenant` and
//! `x-gpualloc-role` (see `istio/`); the services trust those headers and
//! nothing else. The AuthorizationPolicy refuses requests without a valid
//! token, so a client cannot set the headers itself.

use gpualloc_domain::TenantId;
use tonic::{Status, metadata::MetadataMap};

pub const TENANT_HEADER: &str = "x-gpualloc-tenant";
pub const ROLE_HEADER: &str = "x-gpualloc-role";

/// The authenticated caller of one RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant: Option<TenantId>,
    pub admin: bool,
}

impl Caller {
    pub fn admin() -> Caller {
        Caller {
            tenant: None,
            admin: true,
        }
    }

    pub fn tenant(t: TenantId) -> Caller {
        Caller {
            tenant: Some(t),
            admin: false,
        }
    }

    /// Reads the identity headers; a request with neither is
    /// UNAUTHENTICATED.
    pub fn from_metadata(md: &MetadataMap) -> Result<Caller, Status> {
        let text = |name: &str| -> Result<Option<String>, Status> {
            match md.get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|s| Some(s.trim().to_owned()))
                    .map_err(|_| Status::unauthenticated(format!("{name} is not valid text"))),
            }
        };
        let admin = match text(ROLE_HEADER)?.as_deref() {
            None | Some("") | Some("tenant") => false,
            Some("admin") => true,
            Some(other) => {
                return Err(Status::unauthenticated(format!(
                    "{ROLE_HEADER} {other:?} is not a role (use \"admin\" or \"tenant\")"
                )));
            }
        };
        let tenant = match text(TENANT_HEADER)? {
            None => None,
            Some(t) if t.is_empty() => None,
            Some(t) => Some(
                TenantId::parse(t)
                    .map_err(|e| Status::unauthenticated(format!("{TENANT_HEADER}: {e}")))?,
            ),
        };
        if tenant.is_none() && !admin {
            return Err(Status::unauthenticated(format!(
                "no caller identity: send {TENANT_HEADER} (or {ROLE_HEADER}: admin)"
            )));
        }
        Ok(Caller { tenant, admin })
    }

    pub fn from_request<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        Self::from_metadata(req.metadata())
    }

    /// Administrators act for everyone, tenants for themselves.
    pub fn may_access(&self, tenant: &TenantId) -> bool {
        self.admin || self.tenant.as_ref() == Some(tenant)
    }

    pub fn require_admin(&self) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this method needs the admin role ({ROLE_HEADER}: admin)"
            )))
        }
    }

    /// Headers to forward this identity to another service.
    pub fn to_metadata(&self, md: &mut MetadataMap) {
        if self.admin {
            md.insert(
                ROLE_HEADER,
                tonic::metadata::MetadataValue::from_static("admin"),
            );
        }
        if let Some(t) = &self.tenant
            && let Ok(v) = t.as_str().parse()
        {
            md.insert(TENANT_HEADER, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn identity_is_required() {
        let e = Caller::from_metadata(&md(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = Caller::from_metadata(&md(&[(ROLE_HEADER, "root")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = Caller::from_metadata(&md(&[(TENANT_HEADER, "Bad Name")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn tenants_access_only_themselves() {
        let c = Caller::from_metadata(&md(&[(TENANT_HEADER, "team-a")])).unwrap();
        assert!(c.may_access(&TenantId::parse("team-a").unwrap()));
        assert!(!c.may_access(&TenantId::parse("team-b").unwrap()));
        assert_eq!(
            c.require_admin().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let a = Caller::from_metadata(&md(&[(ROLE_HEADER, "admin")])).unwrap();
        assert!(a.may_access(&TenantId::parse("team-b").unwrap()));
        let mut out = MetadataMap::new();
        c.to_metadata(&mut out);
        assert_eq!(Caller::from_metadata(&out).unwrap(), c);
    }
}
