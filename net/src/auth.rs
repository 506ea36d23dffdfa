//! Bearer tokens in `Authorization` headers, shared by every API that takes one.

use http::header::{HeaderMap, AUTHORIZATION};
use subtle::ConstantTimeEq;

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether the request carries `expected` as its bearer token, compared in constant time. An
/// empty `expected` matches nothing.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let presented = bearer_token(headers).unwrap_or("");
    !expected.is_empty() && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        assert!(!bearer_matches(&h, "abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer_token(&h), Some("abc"));
        assert!(bearer_matches(&h, "abc"));
        assert!(!bearer_matches(&h, "abd"));
        assert!(!bearer_matches(&h, ""), "an empty expected token never matches");
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer abc"));
        assert!(bearer_matches(&h, "abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
        assert!(!bearer_matches(&h, "abc"));
    }
}
