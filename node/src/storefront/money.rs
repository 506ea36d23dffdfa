//! Prices: minor units to locale text, after CLDR's patterns for the languages we serve
//! (`$10.00` / `US$10.00`, `CN¥72.00` / `¥72.00`, `¥1,500` / `JP¥1,500`).

use super::i18n::Lang;

/// Digits after the decimal point (ISO 4217 minor unit).
pub fn exponent(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "UYI" | "VND"
        | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// The currency's symbol in `lang`, if it has a short one there.
fn symbol(currency: &str, lang: Lang) -> Option<&'static str> {
    Some(match (lang, currency) {
        (_, "EUR") => "€",
        (_, "GBP") => "£",
        (_, "HKD") => "HK$",
        (_, "TWD") => "NT$",
        (_, "INR") => "₹",
        (_, "CAD") => "CA$",
        (_, "NZD") => "NZ$",
        (_, "MXN") => "MX$",
        (_, "BRL") => "R$",
        (Lang::En, "USD") => "$",
        (Lang::ZhCn, "USD") => "US$",
        (Lang::En, "CNY") => "CN¥",
        (Lang::ZhCn, "CNY") => "¥",
        (Lang::En, "JPY") => "¥",
        (Lang::ZhCn, "JPY") => "JP¥",
        (Lang::En, "KRW") => "₩",
        (Lang::ZhCn, "KRW") => "￦",
        (Lang::En, "AUD") => "A$",
        (Lang::ZhCn, "AUD") => "AU$",
        _ => return None,
    })
}

/// `amount_minor` of `currency` as `lang` writes it.
pub fn format_price(amount_minor: u64, currency: &str, lang: Lang) -> String {
    let exp = exponent(currency);
    let unit = 10u64.pow(exp);
    let whole = group_thousands(amount_minor / unit);
    let number =
        if exp == 0 { whole } else { format!("{whole}.{:0width$}", amount_minor % unit, width = exp as usize) };
    match symbol(currency, lang) {
        Some(symbol) => format!("{symbol}{number}"),
        // CLDR writes code-only currencies as "CHF 10.00" (no-break space) in both languages.
        None => format!("{currency}\u{a0}{number}"),
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_follow_the_locale() {
        assert_eq!(format_price(1000, "USD", Lang::En), "$10.00");
        assert_eq!(format_price(1000, "USD", Lang::ZhCn), "US$10.00");
        assert_eq!(format_price(7200, "CNY", Lang::En), "CN¥72.00");
        assert_eq!(format_price(7200, "CNY", Lang::ZhCn), "¥72.00");
        assert_eq!(format_price(1500, "JPY", Lang::En), "¥1,500");
        assert_eq!(format_price(1500, "JPY", Lang::ZhCn), "JP¥1,500");
        assert_eq!(format_price(905, "EUR", Lang::En), "€9.05");
        assert_eq!(format_price(123_456_789, "USD", Lang::En), "$1,234,567.89");
        assert_eq!(format_price(1234, "KWD", Lang::En), "KWD\u{a0}1.234");
        assert_eq!(format_price(1000, "CHF", Lang::ZhCn), "CHF\u{a0}10.00");
        assert_eq!(format_price(0, "USD", Lang::En), "$0.00");
        assert_eq!(format_price(u64::MAX, "JPY", Lang::En), "¥18,446,744,073,709,551,615");
        assert_eq!(format_price(u64::MAX, "KWD", Lang::En), "KWD\u{a0}18,446,744,073,709,551.615");
    }
}
