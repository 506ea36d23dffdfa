//! Fuzz harnesses for the key-import parser, the join token and the enrolment request. The
//! coordinator never calls them: it exists so that the
//! cargo-fuzz target in `fuzz/` and the stable replay of its corpus (`tests/fuzz_corpora.rs`)
//! run the very same checks. It must not panic on any input, and asserts what must hold.

use std::collections::HashSet;

use crate::import::{content_hash, parse_keys, KeyFormat, ParsedKeys};

/// The formats every input is parsed in: one key per line, and CSV in a few shapes.
const FORMATS: [KeyFormat; 4] = [
    KeyFormat::Lines,
    KeyFormat::Csv { column: 0, header: false },
    KeyFormat::Csv { column: 1, header: true },
    KeyFormat::Csv { column: 2, header: false },
];

/// `data` as a key file (lossy UTF-8, as a key file read by an editor would be), in every
/// format. Each line is accounted for exactly once (blank, key, duplicate, invalid or the CSV
/// header): no line is both valid and invalid. Keys are valid, distinct, in file order, with
/// their content hash. Errors are short and ASCII, so they never quote a key. The keys written
/// back one per line parse to the same keys.
pub fn import_keys(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for format in FORMATS {
        let parsed = parse_keys(&text, format);
        check(&text, format, &parsed);
    }
}

fn check(text: &str, format: KeyFormat, parsed: &ParsedKeys) {
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = body.lines().collect();
    let header_skipped =
        matches!(format, KeyFormat::Csv { header: true, .. }) && lines.first().is_some_and(|l| !l.trim().is_empty());

    let mut accounted = HashSet::new();
    let key_lines = parsed.keys.iter().map(|k| k.line);
    let invalid_lines = parsed.invalid.iter().map(|r| r.line);
    for line in key_lines.chain(parsed.duplicates_in_file.iter().copied()).chain(invalid_lines) {
        assert!((1..=lines.len()).contains(&line), "line {line} of {}", lines.len());
        assert!(accounted.insert(line), "line {line} reported twice ({format:?})");
        assert!(!lines[line - 1].trim().is_empty(), "blank line {line} reported as a row");
    }
    assert_eq!(
        parsed.blank_lines + accounted.len() + usize::from(header_skipped),
        lines.len(),
        "every line is blank, a key, a duplicate, invalid or the header ({format:?})"
    );
    assert_eq!(parsed.blank_lines, lines.iter().filter(|l| l.trim().is_empty()).count());

    assert!(parsed.keys.windows(2).all(|w| w[0].line < w[1].line), "keys in file order");
    let mut secrets = HashSet::new();
    for key in &parsed.keys {
        assert!(key.secret.validate().is_ok(), "an invalid key was accepted");
        assert_eq!(key.hash, content_hash(&key.secret));
        assert!(secrets.insert(key.secret.expose()), "a key accepted twice");
        assert_eq!(key.secret.expose(), key.secret.expose().trim(), "keys are trimmed");
        if format == KeyFormat::Lines {
            assert_eq!(key.secret.expose(), lines[key.line - 1].trim());
        }
    }
    for &line in &parsed.duplicates_in_file {
        assert!(parsed.keys.iter().any(|k| k.line < line), "duplicate line {line} before any key");
        if format == KeyFormat::Lines {
            let repeated = lines[line - 1].trim();
            assert!(parsed.keys.iter().any(|k| k.line < line && k.secret.expose() == repeated));
        }
    }
    // Short ASCII reasons cannot quote a row that is long or not ASCII. (A short ASCII row
    // may well read like a reason: the fuzzer makes such rows.)
    for row in &parsed.invalid {
        assert!(!row.reason.is_empty() && row.reason.len() <= 80 && row.reason.is_ascii(), "{:?}", row.reason);
    }

    // Written back one per line (after a blank line, so no key is read as a byte-order mark),
    // the keys are a clean key file.
    let mut written = String::from("\n");
    for key in &parsed.keys {
        written.push_str(key.secret.expose());
        written.push('\n');
    }
    let again = parse_keys(&written, KeyFormat::Lines);
    assert!(again.invalid.is_empty() && again.duplicates_in_file.is_empty(), "written keys do not parse cleanly");
    let before: Vec<&str> = parsed.keys.iter().map(|k| k.secret.expose()).collect();
    let after: Vec<&str> = again.keys.iter().map(|k| k.secret.expose()).collect();
    assert_eq!(before, after, "keys written back parse to other keys");
}

/// `data` as a join token (lossy UTF-8, as pasted): a token that parses encodes back to exactly
/// the text given (one token, one string), parses to itself again, and never prints its secret.
pub fn join_token(data: &[u8]) {
    use crate::enrol::token::JoinToken;
    let text = String::from_utf8_lossy(data);
    let Ok(token) = JoinToken::parse(&text) else { return };
    let encoded = token.encode().expect("a parsed token encodes");
    assert_eq!(encoded, text.trim(), "a token has one spelling");
    assert_eq!(JoinToken::parse(&encoded).as_ref(), Ok(&token));
    assert!(!format!("{token:?}").contains(&token.secret.to_wire()));
}

/// `data` as an enrolment request: the first byte is the length of the `Authorization` value
/// that follows, the rest is the body. A request that decodes has a secret that round-trips;
/// its signing request either is refused with `BadCsr` or yields a certificate naming exactly
/// the token's node, whatever the request asked for. Refusals never quote a well-formed secret.
pub fn enrol_request(data: &[u8]) {
    use crate::enrol::server::decode_request;
    use crate::enrol::token::TokenSecret;
    use crate::pki::{certificate_der, node_id_from_cert, CertificateAuthority, PkiError};
    use edgecard_protocol::NodeId;
    use std::sync::OnceLock;

    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    let Some((&len, rest)) = data.split_first() else { return };
    let (authorization, body) = rest.split_at(usize::from(len).min(rest.len()));
    let request = match decode_request(Some(authorization), body) {
        Ok(request) => request,
        Err(refusal) => {
            // A well-formed secret (43 base64url characters) never appears in a refusal.
            let secret = std::str::from_utf8(authorization).ok().and_then(|a| a.get(7..)).map(str::trim);
            if let Some(secret) = secret.filter(|s| TokenSecret::from_wire(s).is_ok()) {
                assert!(!refusal.message.contains(secret), "a refusal quotes the secret");
            }
            return;
        }
    };
    assert_eq!(TokenSecret::from_wire(&request.secret.to_wire()).as_ref(), Ok(&request.secret));
    let ca = CA.get_or_init(|| CertificateAuthority::generate("fuzz CA").expect("a CA"));
    let node = NodeId::new("eu-1").expect("a node id");
    match ca.issue_node_from_csr(&node, &request.csr_pem) {
        Ok(cert_pem) => {
            let der = certificate_der(&cert_pem).expect("an issued certificate parses");
            assert_eq!(node_id_from_cert(&der).expect("it names a node"), node);
        }
        Err(PkiError::BadCsr(_)) => {}
        Err(other) => panic!("a signing request failed otherwise than BadCsr: {other}"),
    }
}
