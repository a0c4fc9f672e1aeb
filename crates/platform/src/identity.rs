//! Who is calling: the [`Caller`] that the auth layer
//! ([`crate::layers::auth`]) verified and put into the request's
//! extensions. Handlers read it from there and nowhere else; a request
//! that did not pass the layer has no caller and is refused.

use std::sync::Arc;

use gpualloc_domain::TenantId;
use tonic::{Status, metadata::MetadataMap};

/// Identity headers that Istio sets in `mesh` mode (and that `jwt` mode
/// strips from every request, with every other `x-gpualloc-*` header).
pub const TENANT_HEADER: &str = "x-gpualloc-tenant";
pub const ROLES_HEADER: &str = "x-gpualloc-roles";
pub const SUBJECT_HEADER: &str = "x-gpualloc-subject";
/// The prefix of headers only the mesh may set.
pub const IDENTITY_PREFIX: &str = "x-gpualloc-";

/// The authenticated caller of one RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub` (who, for audit trails).
    pub subject: String,
    pub tenant: Option<TenantId>,
    pub admin: bool,
    /// The bearer token as received, forwarded on calls made for this
    /// caller (CheckQuota) so the next service verifies it again.
    pub token: Option<Arc<str>>,
}

impl Caller {
    /// An administrator with no token (tests of handlers, internal work).
    pub fn admin() -> Caller {
        Caller {
            subject: "admin".into(),
            tenant: None,
            admin: true,
            token: None,
        }
    }

    /// A tenant with no token (tests of handlers).
    pub fn tenant(t: TenantId) -> Caller {
        Caller {
            subject: t.to_string(),
            tenant: Some(t),
            admin: false,
            token: None,
        }
    }

    /// The verified caller of `req`; UNAUTHENTICATED if it has none
    /// (which only a service built without the auth layer would see).
    pub fn from_request<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified caller"))
    }

    /// The tenant a request names, or the caller's own when it names none,
    /// so that a tenant need not repeat what its token says. An
    /// administrator without a tenant of its own must name one.
    pub fn tenant_or_own(&self, requested: &str) -> Result<TenantId, String> {
        if requested.is_empty() {
            return self.tenant.clone().ok_or_else(|| {
                "tenant is required: the caller has no tenant of its own".to_owned()
            });
        }
        TenantId::parse(requested)
    }

    /// Administrators act for everyone, tenants for themselves.
    pub fn may_access(&self, tenant: &TenantId) -> bool {
        self.admin || self.tenant.as_ref() == Some(tenant)
    }

    pub fn require_admin(&self) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this method needs the admin role",
            ))
        }
    }

    /// Forwards this caller's token to another service.
    pub fn to_metadata(&self, md: &mut MetadataMap) {
        if let Some(token) = &self.token
            && let Ok(v) = format!("Bearer {token}").parse()
        {
            md.insert("authorization", v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tenants_access_only_themselves() {
        let c = Caller::tenant(TenantId::parse("team-a").unwrap());
        assert!(c.may_access(&TenantId::parse("team-a").unwrap()));
        assert!(!c.may_access(&TenantId::parse("team-b").unwrap()));
        assert_eq!(
            c.require_admin().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(Caller::admin().may_access(&TenantId::parse("team-b").unwrap()));
    }

    #[test]
    fn a_request_without_a_verified_caller_is_refused() {
        let e = Caller::from_request(&tonic::Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn the_token_is_forwarded() {
        let mut c = Caller::admin();
        c.token = Some(Arc::from("abc.def.ghi"));
        let mut md = MetadataMap::new();
        c.to_metadata(&mut md);
        assert_eq!(md.get("authorization").unwrap(), "Bearer abc.def.ghi");
    }
}
