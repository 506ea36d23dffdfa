//! The JSON API's side of challenges: the headers a client answers with, and the 428 answer.
//!
//! ```text
//! POST /api/v1/orders                          ──► 428 {"error": {"code": "challenge_required", …},
//!                                                       "challenge": {"token", "difficulty",
//!                                                                     "algorithm", "expires_at"}}
//! POST /api/v1/orders + Edgecard-Challenge: <token>
//!                     + Edgecard-Challenge-Solution: <counter>   ──► 201 (or a fresh 428)
//! ```

use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use serde_json::{json, Value};

use super::challenge::{Refusal, Token, ALGORITHM};
use super::Presented;
use crate::time_fmt::rfc3339;

/// The challenge token a client answers with.
pub const CHALLENGE_HEADER: HeaderName = HeaderName::from_static("edgecard-challenge");
/// Its solution: the decimal counter.
pub const SOLUTION_HEADER: HeaderName = HeaderName::from_static("edgecard-challenge-solution");
/// The status of a challenged order attempt.
pub const STATUS: StatusCode = StatusCode::PRECONDITION_REQUIRED;

/// What the request's headers present. Unreadable values count as nothing presented.
pub fn presented(headers: &HeaderMap) -> Presented<'_> {
    let value = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    match (value(&CHALLENGE_HEADER), value(&SOLUTION_HEADER)) {
        (Some(token), Some(solution)) => Presented::Solution { token, solution },
        (Some(token), None) => Presented::Solution { token, solution: "" },
        _ => Presented::Nothing,
    }
}

/// The body of a 428: the error (code `challenge_required`, or `challenge_invalid` when what
/// was presented did not do, with the reason) and the challenge to solve.
pub fn challenge_body(challenge: &Token, refused: Option<Refusal>) -> Value {
    let (code, message) = match refused {
        None => ("challenge_required", "solve the challenge and repeat the request with it".to_string()),
        Some(refusal) => ("challenge_invalid", format!("{refusal}; solve this new challenge")),
    };
    json!({
        "error": { "code": code, "message": message, "reason": refused.map(Refusal::as_str) },
        "challenge": {
            "token": challenge.text,
            "difficulty": challenge.difficulty,
            "algorithm": ALGORITHM,
            "expires_at": rfc3339(edgecard_protocol::UnixMillis(challenge.expires_at.saturating_mul(1000))),
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn headers_present_a_solution() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), Presented::Nothing);
        h.insert(SOLUTION_HEADER, HeaderValue::from_static("12"));
        assert_eq!(presented(&h), Presented::Nothing);
        h.insert(CHALLENGE_HEADER, HeaderValue::from_static("abc"));
        assert_eq!(presented(&h), Presented::Solution { token: "abc", solution: "12" });
    }
}
