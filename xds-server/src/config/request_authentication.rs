//! `RequestAuthentication` (security.istio.io/v1, v1beta1): JWT rules a workload's
//! sidecar verifies. Keys come from the rule itself (`jwks`), a local file
//! (`jwksUri: file:///path`) or an `http(s)://` `jwksUri` that each sidecar's Envoy
//! fetches itself (the control plane makes no outbound requests for users). OpenID
//! discovery from the issuer is an error, not silently unverified tokens.

use super::peer_authentication::PolicySelector;
use super::security::{header_name, selector};
use serde::Deserialize;

type FieldError = (String, String);

fn fe(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<PolicySelector>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long a sidecar waits for a remote `jwksUri` (Go duration, Istio's default 5s);
    /// accepted and unused for local keys, as in Istio.
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// Where a rule's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource<'a> {
    Inline(&'a str),
    File(&'a str),
    /// Fetched by the sidecar's Envoy from this URI.
    Remote(RemoteJwks<'a>),
}

/// An `http(s)://` `jwksUri`, split into what the sidecar's cluster for it needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteJwks<'a> {
    pub uri: &'a str,
    /// `https`: the sidecar originates TLS and verifies the server's certificate.
    pub tls: bool,
    /// Lower case, without brackets for an IPv6 literal.
    pub host: String,
    /// Explicit, or the scheme's default (80, 443).
    pub port: u16,
}

/// Parses an `http(s)://host[:port]/path` URI; anything else is an error message.
pub fn parse_remote(uri: &str) -> Result<RemoteJwks<'_>, String> {
    let parsed: http::Uri = uri
        .parse()
        .map_err(|e| format!("`{uri}` is not a valid URI: {e}"))?;
    let tls = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("`{uri}` must be an http:// or https:// URI")),
    };
    let authority = parsed
        .authority()
        .ok_or_else(|| format!("`{uri}` has no host"))?;
    // Credentials in a URI would end up in every sidecar's config dump.
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{uri}`: user information in the URI is not supported"
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("`{uri}` has no host"));
    }
    // Not `port_u16()`: it reads a port out of range as no port at all.
    let port = match authority.as_str().rsplit_once(':') {
        Some((_, p)) if !p.ends_with(']') => p.parse::<u16>().ok().filter(|p| *p != 0),
        _ => Some(if tls { 443 } else { 80 }),
    }
    .ok_or_else(|| format!("`{uri}` does not name a valid port (1-65535)"))?;
    Ok(RemoteJwks {
        uri,
        tls,
        host,
        port,
    })
}

impl JwtRule {
    /// The key source; validation guarantees one of the two supported forms.
    pub fn jwks_source(&self) -> Result<JwksSource<'_>, String> {
        match (&self.jwks, &self.jwks_uri) {
            (Some(_), Some(_)) => Err("set either jwks or jwksUri, not both".into()),
            (Some(j), None) => Ok(JwksSource::Inline(j)),
            (None, Some(uri)) => {
                let lower = uri.to_ascii_lowercase();
                if lower.starts_with("http://") || lower.starts_with("https://") {
                    return parse_remote(uri).map(JwksSource::Remote);
                }
                let path = uri.strip_prefix("file://").ok_or_else(|| {
                    format!("`{uri}` is not an http(s):// URI or a file:///absolute/path URI")
                })?;
                if !path.starts_with('/') || path.split('/').any(|s| s == "..") {
                    return Err(format!(
                        "`{uri}` must name an absolute path without `..` (file:///etc/jwks.json)"
                    ));
                }
                Ok(JwksSource::File(path))
            }
            (None, None) => Err(
                "jwks or jwksUri is required; OpenID discovery from the issuer is not supported"
                    .into(),
            ),
        }
    }
}

/// Istio's validation of a RequestAuthentication, plus the JWKS sources Trellis supports.
pub fn validate(spec: &RequestAuthenticationSpec) -> Result<(), FieldError> {
    selector(&spec.selector)?;
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let f = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() {
            return Err(fe(format!("{f}.issuer"), "issuer must not be empty"));
        }
        for (j, a) in rule.audiences.iter().enumerate() {
            if a.is_empty() {
                return Err(fe(
                    format!("{f}.audiences[{j}]"),
                    "audiences must not be empty",
                ));
            }
        }
        let field = if rule.jwks.is_some() {
            "jwks"
        } else {
            "jwksUri"
        };
        match rule
            .jwks_source()
            .map_err(|m| fe(format!("{f}.{field}"), m))?
        {
            JwksSource::Inline(j) => jwks(j).map_err(|m| fe(format!("{f}.jwks"), m))?,
            JwksSource::File(_) | JwksSource::Remote(_) => {}
        }
        if let Some(t) = &rule.timeout {
            match crate::config::parse_duration(t) {
                Ok(d) if !d.is_zero() => {}
                Ok(_) => return Err(fe(format!("{f}.timeout"), "must be greater than 0")),
                Err(m) => return Err(fe(format!("{f}.timeout"), m)),
            }
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            header_name(&h.name).map_err(|m| fe(format!("{f}.fromHeaders[{j}].name"), m))?;
        }
        for (j, p) in rule.from_params.iter().enumerate() {
            if p.is_empty() {
                return Err(fe(format!("{f}.fromParams[{j}]"), "must not be empty"));
            }
        }
        for (j, c) in rule.from_cookies.iter().enumerate() {
            if c.is_empty() {
                return Err(fe(format!("{f}.fromCookies[{j}]"), "must not be empty"));
            }
        }
        if let Some(h) = &rule.output_payload_to_header {
            header_name(h).map_err(|m| fe(format!("{f}.outputPayloadToHeader"), m))?;
        }
        for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
            let cf = format!("{f}.outputClaimToHeaders[{j}]");
            header_name(&c.header).map_err(|m| fe(format!("{cf}.header"), m))?;
            if c.claim.is_empty() {
                return Err(fe(format!("{cf}.claim"), "must not be empty"));
            }
        }
    }
    Ok(())
}

/// An inline JWKS must at least be a JSON object with a `keys` array: Envoy would take a
/// malformed one and then reject every token with 401, far from the cause.
fn jwks(text: &str) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("jwks is not valid JSON: {e}"))?;
    match v.get("keys") {
        Some(serde_json::Value::Array(keys)) if !keys.is_empty() => Ok(()),
        _ => Err("jwks must be a JSON Web Key Set: an object with a non-empty `keys` array".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_uris() {
        let rule = |uri: &str| JwtRule {
            issuer: "i".into(),
            jwks_uri: Some(uri.into()),
            ..Default::default()
        };
        assert_eq!(
            rule("file:///etc/jwks.json").jwks_source(),
            Ok(JwksSource::File("/etc/jwks.json"))
        );
        assert_eq!(
            rule("https://Example.com/jwks").jwks_source(),
            Ok(JwksSource::Remote(RemoteJwks {
                uri: "https://Example.com/jwks",
                tls: true,
                host: "example.com".into(),
                port: 443,
            }))
        );
        let Ok(r) = parse_remote("http://127.0.0.7:8080/k.json") else {
            panic!("not remote")
        };
        assert_eq!((r.tls, r.host.as_str(), r.port), (false, "127.0.0.7", 8080));
        let Ok(r) = parse_remote("http://[::1]/k.json") else {
            panic!("not remote")
        };
        assert_eq!((r.host.as_str(), r.port), ("::1", 80));
        for bad in [
            "http:///jwks.json",
            "https://user:pw@idp.example/jwks",
            "http://idp.example:0/jwks",
            "http://idp example/jwks",
            "ftp://idp.example/jwks",
        ] {
            assert!(rule(bad).jwks_source().is_err(), "{bad}");
        }
        assert!(rule("file://host/etc/jwks.json").jwks_source().is_err());
        assert!(rule("file:///etc/../jwks.json").jwks_source().is_err());
    }
}
