//! SPIFFE identities of the Kubernetes shape `spiffe://TD/ns/NS/sa/SA`.

use std::fmt;

use crate::error::CaError;

/// SPIFFE ID limit on the whole URI; longer ones are refused by other implementations too.
const MAX_URI_LEN: usize = 2048;
/// A trust domain is a DNS-like name.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A workload identity: trust domain, namespace and service account.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts without checking them; use [`SpiffeId::parse`] or
    /// [`SpiffeId::from_ns_sa`] for input that comes from outside.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// Parses `spiffe://TD/ns/NS/sa/SA`. Strict: lowercase scheme, no port, user info, query,
    /// fragment, percent-encoding, empty or dot segments, and exactly the `ns`/`sa` path.
    pub fn parse(uri: &str) -> Result<SpiffeId, CaError> {
        let bad = |reason: &str| CaError::InvalidIdentity {
            input: uri.to_string(),
            reason: reason.to_string(),
        };
        if uri.len() > MAX_URI_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("has no path; expected spiffe://TD/ns/NS/sa/SA"))?;
        check_trust_domain(trust_domain).map_err(|r| bad(&r))?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                check_segment("namespace", namespace).map_err(|r| bad(&r))?;
                check_segment("service account", service_account).map_err(|r| bad(&r))?;
                Ok(SpiffeId::new(trust_domain, namespace, service_account))
            }
            _ => Err(bad("path must be exactly /ns/NAMESPACE/sa/SERVICE_ACCOUNT")),
        }
    }

    /// Parses the `NS/SA` form the command line uses, in the given trust domain.
    pub fn from_ns_sa(trust_domain: &str, ns_sa: &str) -> Result<SpiffeId, CaError> {
        let bad = |reason: String| CaError::InvalidIdentity {
            input: ns_sa.to_string(),
            reason,
        };
        check_trust_domain(trust_domain).map_err(bad)?;
        let (namespace, service_account) = ns_sa
            .split_once('/')
            .ok_or_else(|| bad("expected NAMESPACE/SERVICE_ACCOUNT".to_string()))?;
        check_segment("namespace", namespace).map_err(bad)?;
        check_segment("service account", service_account).map_err(bad)?;
        Ok(SpiffeId::new(trust_domain, namespace, service_account))
    }

    /// The identity as a URI: what goes into the certificate's URI SAN.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// SPIFFE trust domains: lowercase letters, digits, `.`, `-`, `_`.
pub(crate) fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".to_string());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("trust domain is longer than 255 bytes".to_string());
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "trust domain {td:?} contains {c:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

/// SPIFFE path segments: letters, digits, `.`, `-`, `_`; not empty, not `.` or `..`.
fn check_segment(what: &str, segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if segment == "." || segment == ".." {
        return Err(format!("{what} cannot be {segment:?}"));
    }
    if let Some(c) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "{what} {segment:?} contains {c:?}; only letters, digits, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_well_formed_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo-reviews").unwrap();
        assert_eq!(
            id,
            SpiffeId::new("cluster.local", "default", "bookinfo-reviews")
        );
        assert_eq!(
            id.uri(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(id.to_string(), id.uri());
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "",
            "spiffe://",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local:443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#frag",
            "spiffe://cluster.local/ns/a%2f/sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            let err = SpiffeId::parse(bad).expect_err(bad);
            assert!(
                matches!(err, CaError::InvalidIdentity { .. }),
                "{bad}: {err}"
            );
        }
        let long = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(2100));
        assert!(SpiffeId::parse(&long).is_err());
    }

    #[test]
    fn parses_the_command_line_form() {
        let id = SpiffeId::from_ns_sa("example.org", "shop/cart").unwrap();
        assert_eq!(id.uri(), "spiffe://example.org/ns/shop/sa/cart");
        for bad in ["shop", "shop/", "/cart", "shop/cart/x", "shop/c art"] {
            assert!(SpiffeId::from_ns_sa("example.org", bad).is_err(), "{bad}");
        }
        assert!(SpiffeId::from_ns_sa("Bad Domain", "shop/cart").is_err());
    }

    #[test]
    fn error_names_the_input() {
        let err = SpiffeId::parse("spiffe://cluster.local/ns/a").unwrap_err();
        assert!(
            err.to_string().contains("spiffe://cluster.local/ns/a"),
            "{err}"
        );
    }
}
