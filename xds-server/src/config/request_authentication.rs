//! `RequestAuthentication` (security.istio.io/v1, v1beta1): JWT rules a workload's
//! sidecar verifies. Keys come from the rule itself (`jwks`) or a local file
//! (`jwksUri: file:///path`); Trellis never fetches keys over the network, so remote
//! `jwksUri`s and OpenID discovery are errors, not silently unverified tokens.

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

/// Where a rule's keys come from: Envoy reads both forms locally, never over the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource<'a> {
    Inline(&'a str),
    File(&'a str),
}

impl JwtRule {
    /// The key source; validation guarantees one of the two supported forms.
    pub fn jwks_source(&self) -> Result<JwksSource<'_>, String> {
        match (&self.jwks, &self.jwks_uri) {
            (Some(_), Some(_)) => Err("set either jwks or jwksUri, not both".into()),
            (Some(j), None) => Ok(JwksSource::Inline(j)),
            (None, Some(uri)) => {
                if uri.starts_with("http://") || uri.starts_with("https://") {
                    return Err(format!(
                        "`{uri}`: remote JWKS is not supported, inline it (jwks) or use file:///path"
                    ));
                }
                let path = uri
                    .strip_prefix("file://")
                    .ok_or_else(|| format!("`{uri}` is not a file:///absolute/path URI"))?;
                if !path.starts_with('/') || path.split('/').any(|s| s == "..") {
                    return Err(format!(
                        "`{uri}` must name an absolute path without `..` (file:///etc/jwks.json)"
                    ));
                }
                Ok(JwksSource::File(path))
            }
            (None, None) => Err(
                "jwks or jwksUri (file://) is required; OpenID discovery from the issuer is not supported"
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
            JwksSource::File(_) => {}
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
        assert!(rule("https://example.com/jwks")
            .jwks_source()
            .unwrap_err()
            .contains("remote JWKS is not supported"));
        assert!(rule("file://host/etc/jwks.json").jwks_source().is_err());
        assert!(rule("file:///etc/../jwks.json").jwks_source().is_err());
    }
}
