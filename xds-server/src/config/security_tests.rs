use super::*;

#[test]
fn istio_patterns() {
    assert_eq!(istio_pattern("*"), Ok(Pattern::Any));
    assert_eq!(istio_pattern("/api*"), Ok(Pattern::Prefix("/api")));
    assert_eq!(istio_pattern("*.json"), Ok(Pattern::Suffix(".json")));
    assert_eq!(istio_pattern("GET"), Ok(Pattern::Exact("GET")));
    assert!(istio_pattern("a*b").is_err());
    assert!(istio_pattern("*a*").is_err());
}

#[test]
fn condition_keys() {
    assert_eq!(
        Attribute::parse_key("request.auth.claims[groups]"),
        Ok(Attribute::RequestClaim(vec!["groups".into()]))
    );
    assert_eq!(
        Attribute::parse_key("request.auth.claims[a][b]"),
        Ok(Attribute::RequestClaim(vec!["a".into(), "b".into()]))
    );
    assert_eq!(
        Attribute::parse_key("request.headers[x-user]"),
        Ok(Attribute::RequestHeader("x-user".into()))
    );
    for bad in [
        "request.auth.claims[]",
        "request.auth.claims[a][]",
        "request.headers[a b]",
        "request.headers",
        "request.auth.presenters",
        "connection.sni",
        "experimental.envoy.filters.a[b]",
    ] {
        assert!(Attribute::parse_key(bad).is_err(), "{bad}");
    }
}

#[test]
fn cidrs() {
    assert_eq!(
        parse_cidr("10.0.0.0/8"),
        Ok(("10.0.0.0".parse().unwrap(), 8))
    );
    assert_eq!(parse_cidr("::1"), Ok(("::1".parse().unwrap(), 128)));
    assert!(parse_cidr("10.0.0.0/33").is_err());
    assert!(parse_cidr("10.0.0/8").is_err());
}
