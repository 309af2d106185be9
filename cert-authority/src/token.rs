//! Bootstrap tokens: compact JWS (ES256) signed with a key of their own, so that rotating the
//! root does not invalidate tokens already handed out in Envoy bootstraps and join commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use zeroize::Zeroizing;

use crate::error::CaError;
use crate::fsutil;
use crate::identity::SpiffeId;
use crate::pem;

/// File of the token signing key in the CA state folder.
pub(crate) const TOKEN_KEY: &str = "token-key.pem";
/// File of the one-time tokens already redeemed (jti, when), in the CA state folder.
pub(crate) const REDEEMED: &str = "redeemed-tokens.json";
/// Redemption records are kept this long past their token's expiry. A token past `exp` is
/// refused as expired anyway; the margin covers a clock stepped backwards, which would
/// otherwise bring a pruned, already used token back to life.
const REDEEMED_KEEP_AFTER_EXP: u64 = 24 * 3600;
const ISSUER: &str = "trellis";
const REGISTERED: [&str; 6] = ["iss", "sub", "kind", "iat", "exp", "jti"];

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A sidecar proving its workload identity on the secure ADS port.
    Workload,
    /// A relay joining the mesh.
    Join,
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenKind::Workload => "workload",
            TokenKind::Join => "join",
        })
    }
}

/// The claims of a verified token.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    /// The SPIFFE URI the token speaks for.
    pub sub: String,
    pub kind: TokenKind,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Random id, for audit lines and revocation lists.
    pub jti: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, String>,
}

impl TokenClaims {
    /// The identity in `sub`.
    pub fn identity(&self) -> Result<SpiffeId, CaError> {
        SpiffeId::parse(&self.sub)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Makes and checks tokens with the ECDSA P-256 key in `token-key.pem`.
pub struct TokenSigner {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
    /// The CA state folder, where [`REDEEMED`] lives.
    dir: PathBuf,
    /// Held across the check and the record of a redemption, so two concurrent uses of
    /// one token in this process cannot both succeed. (One server process per CA dir.)
    redeeming: Mutex<()>,
}

/// One redeemed token in [`REDEEMED`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Redemption {
    sub: String,
    kind: TokenKind,
    exp: u64,
    /// Unix seconds.
    redeemed_at: u64,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Redeemed {
    /// By jti.
    tokens: BTreeMap<String, Redemption>,
}

impl TokenSigner {
    /// Loads `dir/token-key.pem`, creating it (0600) on first start.
    pub(crate) fn open(dir: &Path) -> Result<TokenSigner, CaError> {
        let path = dir.join(TOKEN_KEY);
        let rng = SystemRandom::new();
        let pkcs8 = match fsutil::read_optional(&path)? {
            Some(text) => {
                let text = Zeroizing::new(text);
                let (_, der) = pem::sections(&path.display().to_string(), &text)?
                    .into_iter()
                    .find(|(kind, _)| *kind == rustls_pki_types::pem::SectionKind::PrivateKey)
                    .ok_or_else(|| {
                        CaError::bad_pem(path.display(), "contains no PRIVATE KEY block")
                    })?;
                Zeroizing::new(der)
            }
            None => {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                        .map_err(|_| {
                            CaError::Crypto("generating the token signing key".to_string())
                        })?;
                let der = Zeroizing::new(doc.as_ref().to_vec());
                let text = Zeroizing::new(pem::encode("PRIVATE KEY", &der));
                fsutil::write_atomic(&path, text.as_bytes(), fsutil::PRIVATE)?;
                tracing::info!(path = %path.display(), "generated the token signing key");
                der
            }
        };
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                .map_err(|e| {
                    CaError::bad_pem(
                        path.display(),
                        format!("not an ECDSA P-256 PKCS#8 key: {e}"),
                    )
                })?;
        let kid = pem::fingerprint(key.public_key().as_ref())[..16].to_string();
        Ok(TokenSigner {
            key,
            kid,
            rng,
            dir: dir.to_path_buf(),
            redeeming: Mutex::new(()),
        })
    }

    /// Makes a token for `id`. `claims` are extra string claims; the registered names
    /// (iss, sub, kind, iat, exp, jti) are refused.
    pub fn create(
        &self,
        id: &SpiffeId,
        kind: TokenKind,
        ttl: Duration,
        claims: BTreeMap<String, String>,
    ) -> Result<String, CaError> {
        self.create_at(id, kind, ttl, claims, SystemTime::now())
    }

    pub(crate) fn create_at(
        &self,
        id: &SpiffeId,
        kind: TokenKind,
        ttl: Duration,
        extra: BTreeMap<String, String>,
        now: SystemTime,
    ) -> Result<String, CaError> {
        if let Some(name) = extra.keys().find(|k| REGISTERED.contains(&k.as_str())) {
            return Err(CaError::TokenClaim(name.clone()));
        }
        let mut jti = [0u8; 16];
        self.rng
            .fill(&mut jti)
            .map_err(|_| CaError::Crypto("the system random generator failed".to_string()))?;
        let iat = pem::system_to_unix(now);
        let claims = TokenClaims {
            iss: ISSUER.to_string(),
            sub: id.uri(),
            kind,
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            jti: pem::hex(&jti),
            extra,
        };
        let header = Header {
            alg: "ES256".to_string(),
            typ: "JWT".to_string(),
            kid: self.kid.clone(),
        };
        let signing_input = format!("{}.{}", b64_json(&header)?, b64_json(&claims)?);
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| CaError::Crypto("signing the token".to_string()))?;
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        tracing::info!(
            target: "trellis::audit",
            identity = %id,
            kind = ?kind,
            jti = %claims.jti,
            exp = claims.exp,
            "token issued"
        );
        Ok(token)
    }

    /// Checks signature, issuer, kind and expiry, in that order; each failure has its own error.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<TokenClaims, CaError> {
        self.verify_at(token, kind, SystemTime::now())
    }

    pub(crate) fn verify_at(
        &self,
        token: &str,
        kind: TokenKind,
        now: SystemTime,
    ) -> Result<TokenClaims, CaError> {
        self.verifier().verify_at(token, kind, now)
    }

    /// What checks this signer's tokens without being able to make them: handed to
    /// relays, so a member cluster can authenticate its sidecars while the control plane
    /// is out of reach.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            public_key: self.key.public_key().as_ref().to_vec(),
        }
    }

    /// Verifies a one-time token and uses it up: its `jti` is recorded in
    /// `redeemed-tokens.json` (written atomically, 0600) before this returns, so a second
    /// use, in this process or after a restart, is refused with [`CaError::TokenUsed`].
    /// Callers check everything else about the request first: a redeemed token is gone even
    /// if what follows fails.
    pub fn redeem(&self, token: &str, kind: TokenKind) -> Result<TokenClaims, CaError> {
        self.redeem_at(token, kind, SystemTime::now())
    }

    pub(crate) fn redeem_at(
        &self,
        token: &str,
        kind: TokenKind,
        now: SystemTime,
    ) -> Result<TokenClaims, CaError> {
        let claims = self.verify_at(token, kind, now)?;
        let _held = self
            .redeeming
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let path = self.dir.join(REDEEMED);
        let mut redeemed: Redeemed = match fsutil::read_optional(&path)? {
            Some(text) => serde_json::from_str(&text).map_err(|e| CaError::State {
                path: path.clone(),
                reason: format!("not a list of redeemed tokens: {e}"),
            })?,
            None => Redeemed::default(),
        };
        if let Some(used) = redeemed.tokens.get(&claims.jti) {
            let at = pem::rfc3339(pem::unix_to_system(
                i64::try_from(used.redeemed_at).unwrap_or(i64::MAX),
            ));
            tracing::warn!(
                target: "trellis::audit",
                identity = %claims.sub,
                kind = %kind,
                jti = %claims.jti,
                redeemed_at = %at,
                "one-time token used again: refused"
            );
            return Err(CaError::TokenUsed {
                kind,
                jti: claims.jti,
                at,
            });
        }
        let now_unix = pem::system_to_unix(now);
        redeemed
            .tokens
            .retain(|_, r| r.exp.saturating_add(REDEEMED_KEEP_AFTER_EXP) > now_unix);
        redeemed.tokens.insert(
            claims.jti.clone(),
            Redemption {
                sub: claims.sub.clone(),
                kind,
                exp: claims.exp,
                redeemed_at: now_unix,
            },
        );
        let json = serde_json::to_vec_pretty(&redeemed).map_err(|e| CaError::State {
            path: path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        fsutil::write_atomic(&path, &json, fsutil::PRIVATE)?;
        tracing::info!(
            target: "trellis::audit",
            identity = %claims.sub,
            kind = %kind,
            jti = %claims.jti,
            "one-time token redeemed"
        );
        Ok(claims)
    }
}

/// Checks tokens against a signer's public key (an uncompressed P-256 point).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenVerifier {
    public_key: Vec<u8>,
}

impl TokenVerifier {
    pub fn from_public_key(public_key: &[u8]) -> Result<TokenVerifier, CaError> {
        // An uncompressed SEC1 point: 0x04, then x and y of 32 bytes each.
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(CaError::Crypto(
                "a token verification key is an uncompressed P-256 point (65 bytes)".to_string(),
            ));
        }
        Ok(TokenVerifier {
            public_key: public_key.to_vec(),
        })
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Checks signature, issuer, kind and expiry, in that order; each failure has its own error.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<TokenClaims, CaError> {
        self.verify_at(token, kind, SystemTime::now())
    }

    pub(crate) fn verify_at(
        &self,
        token: &str,
        kind: TokenKind,
        now: SystemTime,
    ) -> Result<TokenClaims, CaError> {
        let malformed = |why: &str| CaError::TokenMalformed(why.to_string());
        let parts: Vec<&str> = token.trim().split('.').collect();
        let [header_b64, claims_b64, sig_b64] = parts.as_slice() else {
            return Err(malformed("expected three base64url parts separated by '.'"));
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| malformed("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header_json)
            .map_err(|_| malformed("header is not a JWS header"))?;
        if header.alg != "ES256" {
            return Err(CaError::TokenMalformed(format!(
                "algorithm {:?} is not accepted; only ES256",
                header.alg
            )));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| malformed("signature is not base64url"))?;
        let signing_input_len = header_b64.len() + 1 + claims_b64.len();
        let signing_input = &token.trim().as_bytes()[..signing_input_len];
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public_key)
            .verify(signing_input, &sig)
            .map_err(|_| CaError::TokenForged)?;

        let claims_json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| malformed("claims are not base64url"))?;
        let claims: TokenClaims = serde_json::from_slice(&claims_json)
            .map_err(|e| CaError::TokenMalformed(format!("claims do not parse: {e}")))?;
        if claims.iss != ISSUER {
            return Err(CaError::TokenMalformed(format!(
                "issuer {:?} is not {ISSUER:?}",
                claims.iss
            )));
        }
        if claims.kind != kind {
            return Err(CaError::TokenKind {
                expected: kind,
                got: claims.kind,
            });
        }
        if pem::system_to_unix(now) >= claims.exp {
            return Err(CaError::TokenExpired { exp: claims.exp });
        }
        Ok(claims)
    }
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn b64_json<T: serde::Serialize>(value: &T) -> Result<String, CaError> {
    let json = serde_json::to_vec(value).map_err(|e| CaError::crypto("encoding the token", e))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (tempfile::TempDir, TokenSigner) {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenSigner::open(dir.path()).unwrap();
        (dir, s)
    }

    fn id() -> SpiffeId {
        SpiffeId::new("cluster.local", "default", "reviews")
    }

    #[test]
    fn round_trip_with_extra_claims() {
        let (_d, s) = signer();
        let mut extra = BTreeMap::new();
        extra.insert("cluster".to_string(), "east".to_string());
        let token = s
            .create(&id(), TokenKind::Workload, Duration::from_secs(600), extra)
            .unwrap();
        assert_eq!(token.split('.').count(), 3);
        let claims = s.verify(&token, TokenKind::Workload).unwrap();
        assert_eq!(claims.identity().unwrap(), id());
        assert_eq!(claims.iss, "trellis");
        assert_eq!(claims.exp - claims.iat, 600);
        assert_eq!(
            claims.extra.get("cluster").map(String::as_str),
            Some("east")
        );
        assert_eq!(claims.jti.len(), 32);
    }

    #[test]
    fn key_survives_reopen_with_mode_0600() {
        let (dir, s) = signer();
        let token = s
            .create(
                &id(),
                TokenKind::Join,
                Duration::from_secs(60),
                BTreeMap::new(),
            )
            .unwrap();
        let again = TokenSigner::open(dir.path()).unwrap();
        again.verify(&token, TokenKind::Join).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(TOKEN_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn expired_is_refused() {
        let (_d, s) = signer();
        let then = SystemTime::now() - Duration::from_secs(3600);
        let token = s
            .create_at(
                &id(),
                TokenKind::Workload,
                Duration::from_secs(60),
                BTreeMap::new(),
                then,
            )
            .unwrap();
        let err = s.verify(&token, TokenKind::Workload).unwrap_err();
        assert!(matches!(err, CaError::TokenExpired { .. }), "{err}");
        // exp is exp: a token is dead at its expiry second, no grace.
        let now = SystemTime::now();
        let token = s
            .create_at(
                &id(),
                TokenKind::Workload,
                Duration::from_secs(10),
                BTreeMap::new(),
                now,
            )
            .unwrap();
        let at_exp = now + Duration::from_secs(10);
        assert!(matches!(
            s.verify_at(&token, TokenKind::Workload, at_exp),
            Err(CaError::TokenExpired { .. })
        ));
    }

    #[test]
    fn forged_is_refused() {
        let (_d, s) = signer();
        let (_d2, other) = signer();
        let token = s
            .create(
                &id(),
                TokenKind::Workload,
                Duration::from_secs(60),
                BTreeMap::new(),
            )
            .unwrap();
        let err = other.verify(&token, TokenKind::Workload).unwrap_err();
        assert!(matches!(err, CaError::TokenForged), "{err}");
        assert!(err.to_string().contains("not issued by this control plane"));

        // Altered signature.
        let (rest, sig) = token.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[10] ^= 0x01;
        let altered = format!("{rest}.{}", URL_SAFE_NO_PAD.encode(&raw));
        assert!(matches!(
            s.verify(&altered, TokenKind::Workload),
            Err(CaError::TokenForged)
        ));

        // Altered claims (another identity) with the original signature.
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = "spiffe://cluster.local/ns/kube-system/sa/admin".into();
        let swapped = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()),
            parts[2]
        );
        assert!(matches!(
            s.verify(&swapped, TokenKind::Workload),
            Err(CaError::TokenForged)
        ));
    }

    #[test]
    fn wrong_kind_is_refused() {
        let (_d, s) = signer();
        let token = s
            .create(
                &id(),
                TokenKind::Join,
                Duration::from_secs(60),
                BTreeMap::new(),
            )
            .unwrap();
        let err = s.verify(&token, TokenKind::Workload).unwrap_err();
        assert!(
            matches!(
                err,
                CaError::TokenKind {
                    expected: TokenKind::Workload,
                    got: TokenKind::Join
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let (_d, s) = signer();
        for bad in ["", "abc", "a.b", "a.b.c.d", "!!!.???.###", "e30.e30.e30"] {
            let err = s.verify(bad, TokenKind::Workload).unwrap_err();
            assert!(matches!(err, CaError::TokenMalformed(_)), "{bad}: {err}");
        }
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"x"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"iss":"trellis"}"#)
        );
        assert!(matches!(
            s.verify(&none_alg, TokenKind::Workload),
            Err(CaError::TokenMalformed(_))
        ));
    }

    fn join_token(s: &TokenSigner, ttl: u64, now: SystemTime) -> String {
        s.create_at(
            &SpiffeId::new("cluster.local", "trellis-system", "relay-east"),
            TokenKind::Join,
            Duration::from_secs(ttl),
            BTreeMap::from([("cluster".to_string(), "east".to_string())]),
            now,
        )
        .unwrap()
    }

    #[test]
    fn a_token_redeems_once_and_the_record_survives_a_restart() {
        let (dir, s) = signer();
        let token = join_token(&s, 600, SystemTime::now());
        let claims = s.redeem(&token, TokenKind::Join).unwrap();
        assert_eq!(claims.extra["cluster"], "east");

        let err = s.redeem(&token, TokenKind::Join).unwrap_err();
        assert!(matches!(err, CaError::TokenUsed { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("join token already used"), "{msg}");
        assert!(msg.contains(&claims.jti), "{msg}");
        assert!(msg.contains("redeemed at 20"), "names when: {msg}");

        // Durable: a restarted signer (same folder) refuses it too.
        let again = TokenSigner::open(dir.path()).unwrap();
        assert!(matches!(
            again.redeem(&token, TokenKind::Join),
            Err(CaError::TokenUsed { .. })
        ));
        // Verification alone does not use a token up, nor is it affected by redemption.
        let other = join_token(&s, 600, SystemTime::now());
        s.verify(&other, TokenKind::Join).unwrap();
        s.verify(&other, TokenKind::Join).unwrap();
        s.redeem(&other, TokenKind::Join).unwrap();

        let path = dir.path().join(REDEEMED);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the token itself is never stored");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn expired_forged_and_wrong_kind_are_refused_without_being_recorded() {
        let (dir, s) = signer();
        let old = join_token(&s, 60, SystemTime::now() - Duration::from_secs(3600));
        assert!(matches!(
            s.redeem(&old, TokenKind::Join),
            Err(CaError::TokenExpired { .. })
        ));
        let (_d2, other) = signer();
        let forged = join_token(&other, 600, SystemTime::now());
        assert!(matches!(
            s.redeem(&forged, TokenKind::Join),
            Err(CaError::TokenForged)
        ));
        let workload = s
            .create(
                &id(),
                TokenKind::Workload,
                Duration::from_secs(60),
                BTreeMap::new(),
            )
            .unwrap();
        assert!(matches!(
            s.redeem(&workload, TokenKind::Join),
            Err(CaError::TokenKind { .. })
        ));
        assert!(!dir.path().join(REDEEMED).exists(), "nothing was redeemed");
    }

    #[test]
    fn concurrent_redemptions_of_one_token_let_exactly_one_through() {
        let (_d, s) = signer();
        let token = join_token(&s, 600, SystemTime::now());
        let results: Vec<Result<TokenClaims, CaError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| s.redeem(&token, TokenKind::Join)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, CaError::TokenUsed { .. })));
    }

    #[test]
    fn records_of_long_expired_tokens_are_pruned() {
        let (dir, s) = signer();
        let start = SystemTime::now();
        let first = join_token(&s, 60, start);
        s.redeem_at(&first, TokenKind::Join, start).unwrap();
        // Two days later the first token is long dead; redeeming another drops its record.
        let later = start + Duration::from_secs(2 * 24 * 3600);
        let second = join_token(&s, 60, later);
        s.redeem_at(&second, TokenKind::Join, later).unwrap();
        let text = std::fs::read_to_string(dir.path().join(REDEEMED)).unwrap();
        let redeemed: Redeemed = serde_json::from_str(&text).unwrap();
        assert_eq!(redeemed.tokens.len(), 1, "{text}");
        // A token expired only recently keeps its record: a clock stepped back cannot revive it.
        let third = join_token(&s, 60, later);
        let soon = later + Duration::from_secs(120);
        s.redeem_at(&third, TokenKind::Join, later).unwrap();
        let fourth = join_token(&s, 600, soon);
        s.redeem_at(&fourth, TokenKind::Join, soon).unwrap();
        assert!(matches!(
            s.redeem_at(&third, TokenKind::Join, later),
            Err(CaError::TokenUsed { .. })
        ));
    }

    #[test]
    fn a_corrupt_redemption_file_fails_closed() {
        let (dir, s) = signer();
        std::fs::write(dir.path().join(REDEEMED), "{not json").unwrap();
        let token = join_token(&s, 600, SystemTime::now());
        let err = s.redeem(&token, TokenKind::Join).unwrap_err();
        assert!(matches!(err, CaError::State { .. }), "{err}");
        assert!(err.to_string().contains(REDEEMED), "{err}");
    }

    #[test]
    fn registered_claims_cannot_be_overridden() {
        let (_d, s) = signer();
        let mut extra = BTreeMap::new();
        extra.insert("sub".to_string(), "spiffe://x/ns/a/sa/b".to_string());
        let err = s
            .create(&id(), TokenKind::Workload, Duration::from_secs(60), extra)
            .unwrap_err();
        assert!(
            matches!(err, CaError::TokenClaim(ref c) if c == "sub"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod verifier_tests {
    use super::*;

    #[test]
    fn a_verifier_checks_tokens_without_the_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let signer = TokenSigner::open(dir.path()).unwrap();
        let id = SpiffeId::new("cluster.local", "default", "reviews");
        let token = signer
            .create(
                &id,
                TokenKind::Workload,
                Duration::from_secs(60),
                BTreeMap::new(),
            )
            .unwrap();
        let verifier = TokenVerifier::from_public_key(signer.verifier().public_key()).unwrap();
        assert_eq!(
            verifier.verify(&token, TokenKind::Workload).unwrap().sub,
            id.uri()
        );
        assert!(matches!(
            verifier.verify(&token, TokenKind::Join),
            Err(CaError::TokenKind { .. })
        ));
        let other = tempfile::tempdir().unwrap();
        let foreign = TokenSigner::open(other.path()).unwrap().verifier();
        assert!(matches!(
            foreign.verify(&token, TokenKind::Workload),
            Err(CaError::TokenForged)
        ));
        assert!(TokenVerifier::from_public_key(&[1, 2, 3]).is_err());
    }
}
