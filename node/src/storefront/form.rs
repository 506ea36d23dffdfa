//! Small parsers for what browsers send: query strings, urlencoded form bodies, cookies.
//! All of them are total: any input gives a value, never a panic.

use edgecard_protocol::Sku;
use http::header::{self, HeaderMap};

use super::pages::FormValues;

/// `a=1&b=x+y%21` → `[("a","1"), ("b","x y!")]`. Invalid UTF-8 is replaced; at most 64 pairs.
pub fn parse_urlencoded(input: &str) -> Vec<(String, String)> {
    input
        .split('&')
        .filter(|pair| !pair.is_empty())
        .take(64)
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

/// The first value of `name`.
pub fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// What a checkout form (`POST /checkout`) says: the sku when it is a well-formed one, and the
/// other fields trimmed and cut to the lengths the form allows, ready to be checked or echoed
/// back into the form.
#[derive(Debug, Clone)]
pub struct CheckoutForm {
    pub sku: Option<Sku>,
    pub values: FormValues,
}

/// Longest quantity, e-mail, currency and channel a checkout form keeps, in characters.
pub const CHECKOUT_FIELD_CHARS: [usize; 4] = [12, 254, 8, 32];

/// Reads the checkout form's fields out of its decoded pairs (the first of each name counts).
pub fn checkout_form(pairs: &[(String, String)]) -> CheckoutForm {
    let [quantity, email, currency, channel] = CHECKOUT_FIELD_CHARS;
    let cut = |value: &str, chars: usize| value.trim().chars().take(chars).collect::<String>();
    CheckoutForm {
        sku: first(pairs, "sku").and_then(|s| Sku::new(s).ok()),
        values: FormValues {
            quantity: cut(first(pairs, "quantity").unwrap_or("1"), quantity),
            email: cut(first(pairs, "email").unwrap_or(""), email),
            currency: first(pairs, "currency").map(|c| cut(c, currency)),
            channel: first(pairs, "channel").map(|c| cut(c, channel)),
        },
    }
}

/// The value of cookie `name`, from any `Cookie` header.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().split_once('=').filter(|(n, _)| *n == name).map(|(_, v)| v.trim()))
}

/// Whether the request carries an HTML form (`application/x-www-form-urlencoded`).
pub fn is_form(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn urlencoded_pairs_are_decoded() {
        let pairs = parse_urlencoded("sku=game-10&email=a%40b.c&note=x+y%21&empty=&flag&bad=%zz%4");
        assert_eq!(first(&pairs, "sku"), Some("game-10"));
        assert_eq!(first(&pairs, "email"), Some("a@b.c"));
        assert_eq!(first(&pairs, "note"), Some("x y!"));
        assert_eq!(first(&pairs, "empty"), Some(""));
        assert_eq!(first(&pairs, "flag"), Some(""));
        assert_eq!(first(&pairs, "bad"), Some("%zz%4"));
        assert_eq!(first(&pairs, "missing"), None);
        assert_eq!(first(&parse_urlencoded("a=%"), "a"), Some("%"));
        assert_eq!(first(&parse_urlencoded("a=%f"), "a"), Some("%f"));
        assert_eq!(first(&parse_urlencoded("a=%ff"), "a"), Some("\u{fffd}"));
        assert!(parse_urlencoded("").is_empty());
        assert_eq!(parse_urlencoded(&"a=1&".repeat(1000)).len(), 64);
    }

    #[test]
    fn cookies_and_form_types_are_read() {
        let mut h = HeaderMap::new();
        assert_eq!(cookie(&h, "lang"), None);
        h.append(header::COOKIE, HeaderValue::from_static("a=1; lang=zh-CN"));
        assert_eq!(cookie(&h, "lang"), Some("zh-CN"));
        assert_eq!(cookie(&h, "la"), None);
        assert!(!is_form(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"));
        assert!(is_form(&h));
    }
}
