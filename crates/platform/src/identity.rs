//! Who is calling: the [`Caller`] that the auth layer
//! ([`crate::layers::auth`]) verified and put into the request's
//! extensions. Handlers read it from there and nowhere else; a request
//! that did not pass the layer has no caller and is refused.

use tonic::{Status, metadata::MetadataMap};

/// Identity headers that Istio sets in `mesh` mode (and that `jwt` mode
/// strips from every request, with every other `x-gpualloc-*` header).
pub const TENANT_HEADER: &str = "x-gpualloc-tenant";
pub const ROLES_HEADER: &str = "x-gpualloc-roles";
pub const SUBJECT_HEADER: &str = "x-gpualloc-subject";
/// The prefix of headers only the mesh may set.
pub const IDENTITY_PREFIX: &str = "x-gpualloc-";

pub use gpualloc_domain::Caller;

/// What the gRPC edge does with a [`Caller`]: find it in a request, refuse
/// a non-administrator, forward its token.
pub trait CallerExt: Sized {
    /// The verified caller of `req`; UNAUTHENTICATED if it has none
    /// (which only a service built without the auth layer would see).
    fn from_request<T>(req: &tonic::Request<T>) -> Result<Self, Status>;
    fn require_admin(&self) -> Result<(), Status>;
    /// Forwards this caller's token to another service.
    fn to_metadata(&self, md: &mut MetadataMap);
}

impl CallerExt for Caller {
    fn from_request<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified caller"))
    }

    fn require_admin(&self) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this method needs the admin role",
            ))
        }
    }

    fn to_metadata(&self, md: &mut MetadataMap) {
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
    use std::sync::Arc;

    use super::*;

    #[test]
    fn only_an_admin_passes_require_admin() {
        let c = Caller::tenant(gpualloc_domain::TenantId::parse("team-a").unwrap());
        assert_eq!(
            c.require_admin().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(Caller::admin().require_admin().is_ok());
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
