//! Who acts: the verified caller of a request, as the domain sees it
//! (whose allocations it may touch, whether it administers, what name
//! goes into the history). How a caller is verified and carried through
//! a request is the platform's business, not this type's.

use std::sync::Arc;

use crate::TenantId;

/// The authenticated caller of one request.
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
        assert!(Caller::admin().may_access(&TenantId::parse("team-b").unwrap()));
    }

    #[test]
    fn a_tenant_need_not_name_itself_but_an_admin_must() {
        let c = Caller::tenant(TenantId::parse("team-a").unwrap());
        assert_eq!(c.tenant_or_own("").unwrap().as_str(), "team-a");
        assert!(Caller::admin().tenant_or_own("").is_err());
        assert_eq!(
            Caller::admin().tenant_or_own("team-b").unwrap().as_str(),
            "team-b"
        );
    }
}
