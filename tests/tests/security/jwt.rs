//! JSON Web Tokens for the RequestAuthentication tests: an ES256 (ECDSA P-256 / SHA-256)
//! key made per test, its JWKS, and compact JWS tokens signed with it (RFC 7515, 7517,
//! 7518, 7519), built by hand on `ring` so the test controls every byte (bad signatures,
//! expired claims).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// An ES256 signing key with a key id.
pub struct JwtKey {
    pair: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).finish()
    }
}

impl JwtKey {
    /// A fresh random P-256 key.
    pub fn generate(kid: &str) -> JwtKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generating a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("loading the generated key");
        JwtKey {
            pair,
            kid: kid.to_owned(),
            rng,
        }
    }

    /// The public key as a JWK (RFC 7518 section 6.2).
    pub fn jwk(&self) -> Value {
        // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
        let point = self.pair.public_key().as_ref();
        assert_eq!(point.len(), 65, "unexpected P-256 public key encoding");
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        })
    }

    /// A compact JWS of `claims`, with this key's `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // FIXED signing yields r || s, 64 bytes, which is JWS's ES256 format.
        let signature = self
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .expect("signing");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

/// A JWKS document (`{"keys": [...]}`) as compact JSON, as RequestAuthentication's
/// `jwks` field takes it.
pub fn jwks(keys: &[&JwtKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Claims of a token by `issuer` for `subject`, valid from `iat` until `exp`.
pub fn claims(issuer: &str, subject: &str, iat: u64, exp: u64) -> Value {
    json!({"iss": issuer, "sub": subject, "iat": iat, "exp": exp})
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn token_verifies_with_the_jwk() {
        let key = JwtKey::generate("k1");
        let token = key.sign(&claims("iss", "sub", 1, 2));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let jwk = key.jwk();
        let x = URL_SAFE_NO_PAD
            .decode(jwk["x"].as_str().expect("x"))
            .expect("b64");
        let y = URL_SAFE_NO_PAD
            .decode(jwk["y"].as_str().expect("y"))
            .expect("b64");
        let mut point = vec![4u8];
        point.extend(x);
        point.extend(y);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature verifies");
        let payload: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(payload["sub"], "sub");
    }
}
