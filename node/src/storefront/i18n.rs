//! Languages and message catalogs. Every text the storefront shows comes from a TOML catalog
//! embedded at build time (`locales/*.toml`); templates name messages through [`Msg`], so a
//! missing key is caught by the unit test below rather than by a buyer.

use std::collections::HashMap;
use std::sync::LazyLock;

use http::header::{self, HeaderMap};

/// A language the storefront speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    En,
    ZhCn,
}

impl Lang {
    pub const ALL: [Lang; 2] = [Lang::En, Lang::ZhCn];

    /// The BCP 47 tag: `lang` attribute, `Content-Language`, cookie and `?lang=` value.
    pub fn tag(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::ZhCn => "zh-CN",
        }
    }

    /// The language's own name, for the switcher.
    pub fn native_name(self) -> &'static str {
        match self {
            Lang::En => "English",
            Lang::ZhCn => "简体中文",
        }
    }

    /// An exact tag as used in links and the cookie (case-insensitive).
    pub fn from_tag(tag: &str) -> Option<Lang> {
        Lang::ALL.into_iter().find(|l| l.tag().eq_ignore_ascii_case(tag))
    }

    /// A language range from `Accept-Language` (`zh`, `zh-Hans-CN`, `en-GB`, …).
    fn from_range(range: &str) -> Option<Lang> {
        let primary = range.split(['-', '_']).next().unwrap_or("");
        if primary.eq_ignore_ascii_case("zh") {
            Some(Lang::ZhCn)
        } else if primary.eq_ignore_ascii_case("en") {
            Some(Lang::En)
        } else {
            None
        }
    }

    fn catalog(self) -> &'static HashMap<String, String> {
        match self {
            Lang::En => &CATALOGS.0,
            Lang::ZhCn => &CATALOGS.1,
        }
    }

    /// The text of `msg`; falls back to English, then to the key (never panics).
    pub fn t(self, msg: Msg) -> &'static str {
        self.catalog()
            .get(msg.key())
            .or_else(|| Lang::En.catalog().get(msg.key()))
            .map(String::as_str)
            .unwrap_or(msg.key())
    }

    /// The text of `msg` with `{name}` placeholders replaced by `args`.
    pub fn f(self, msg: Msg, args: &[(&str, &str)]) -> String {
        let mut text = self.t(msg).to_string();
        for (name, value) in args {
            text = text.replace(&format!("{{{name}}}"), value);
        }
        text
    }
}

/// The buyer's language by `Accept-Language`, honouring q-values; English when nothing matches.
pub fn negotiate(headers: &HeaderMap) -> Lang {
    let Some(value) = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()) else {
        return Lang::En;
    };
    let mut best: Option<(u16, Lang)> = None;
    for item in value.split(',').take(32) {
        let mut parts = item.split(';');
        let range = parts.next().unwrap_or("").trim();
        let mut q = 1000u16;
        for param in parts {
            if let Some(v) = param.trim().strip_prefix("q=").or_else(|| param.trim().strip_prefix("Q=")) {
                q = parse_qvalue(v.trim()).unwrap_or(0);
            }
        }
        if q == 0 {
            continue;
        }
        if let Some(lang) = Lang::from_range(range) {
            // Strictly greater: on a tie the earlier entry wins.
            if best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, lang));
            }
        }
    }
    best.map_or(Lang::En, |(_, lang)| lang)
}

/// `0`, `0.5`, `1.000` → thousandths; anything else is `None`.
fn parse_qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_value: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(frac_value),
        "1" if frac_value == 0 => Some(1000),
        _ => None,
    }
}

const EN_TOML: &str = include_str!("locales/en.toml");
const ZH_CN_TOML: &str = include_str!("locales/zh-CN.toml");

static CATALOGS: LazyLock<(HashMap<String, String>, HashMap<String, String>)> =
    LazyLock::new(|| (parse_catalog(EN_TOML).unwrap_or_default(), parse_catalog(ZH_CN_TOML).unwrap_or_default()));

/// Flattens a catalog's tables into `section.key` → text.
fn parse_catalog(text: &str) -> Result<HashMap<String, String>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    flatten("", &table, &mut out)?;
    Ok(out)
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut HashMap<String, String>) -> Result<(), String> {
    for (key, value) in table {
        let full = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::String(s) => {
                out.insert(full, s.clone());
            }
            toml::Value::Table(t) => flatten(&full, t, out)?,
            _ => return Err(format!("{full}: messages must be strings")),
        }
    }
    Ok(())
}

macro_rules! messages {
    ($($variant:ident = $key:literal,)*) => {
        /// A message of the catalogs.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Msg { $($variant,)* }

        impl Msg {
            pub const ALL: &'static [Msg] = &[$(Msg::$variant,)*];

            pub fn key(self) -> &'static str {
                match self { $(Msg::$variant => $key,)* }
            }
        }
    };
}

messages! {
    SiteName = "site.name",
    SiteTagline = "site.tagline",
    SiteSkip = "site.skip",
    SiteLanguage = "site.language",
    SiteAllProducts = "site.all_products",
    SiteFooter = "site.footer",
    SiteLabPayments = "site.lab_payments",
    ListTitle = "list.title",
    ListEmpty = "list.empty",
    ListView = "list.view",
    StockIn = "stock.in",
    StockLow = "stock.low",
    StockOut = "stock.out",
    ProductPrice = "product.price",
    ProductSoldOutBody = "product.sold_out_body",
    ProductNotPurchasable = "product.not_purchasable",
    CheckoutHeading = "checkout.heading",
    CheckoutQuantity = "checkout.quantity",
    CheckoutQuantityHint = "checkout.quantity_hint",
    CheckoutEmail = "checkout.email",
    CheckoutEmailHint = "checkout.email_hint",
    CheckoutCurrency = "checkout.currency",
    CheckoutChannel = "checkout.channel",
    CheckoutSubmit = "checkout.submit",
    CheckoutErrorsHeading = "checkout.errors_heading",
    CheckoutErrorQuantity = "checkout.error_quantity",
    CheckoutErrorEmail = "checkout.error_email",
    CheckoutErrorCurrency = "checkout.error_currency",
    CheckoutErrorChannel = "checkout.error_channel",
    ChannelSandbox = "channel.sandbox",
    ChannelStripe = "channel.stripe",
    ChannelEpay = "channel.epay",
    PayTitle = "pay.title",
    PaySandboxNotice = "pay.sandbox_notice",
    PayAmount = "pay.amount",
    PayItem = "pay.item",
    PayButton = "pay.button",
    PayReservedUntil = "pay.reserved_until",
    OrderTitle = "order.title",
    OrderNumber = "order.number",
    OrderStatus = "order.status",
    OrderItem = "order.item",
    OrderQuantity = "order.quantity",
    OrderTotal = "order.total",
    OrderKeysHeading = "order.keys_heading",
    OrderCopy = "order.copy",
    OrderCopied = "order.copied",
    OrderKeepPrivate = "order.keep_private",
    OrderBookmark = "order.bookmark",
    OrderReservedBody = "order.reserved_body",
    OrderPayNow = "order.pay_now",
    OrderAutoRefresh = "order.auto_refresh",
    OrderExpiredBody = "order.expired_body",
    OrderNewOrder = "order.new_order",
    OrderAwaitingBody = "order.awaiting_body",
    OrderRefundedBody = "order.refunded_body",
    OrderDeliveredAt = "order.delivered_at",
    OrderReturnLinkUntil = "order.return_link_until",
    StatusReserved = "status.reserved",
    StatusDelivered = "status.delivered",
    StatusExpired = "status.expired",
    StatusPaidAwaitingStock = "status.paid_awaiting_stock",
    StatusRefunded = "status.refunded",
    ErrorHome = "error.home",
    ErrorBackToProduct = "error.back_to_product",
    ErrorTryAgain = "error.try_again",
    ErrorNotFoundTitle = "error.not_found_title",
    ErrorNotFoundBody = "error.not_found_body",
    ErrorUnknownOrderTitle = "error.unknown_order_title",
    ErrorUnknownOrderBody = "error.unknown_order_body",
    ErrorReturnExpiredTitle = "error.return_expired_title",
    ErrorReturnExpiredBody = "error.return_expired_body",
    ErrorUnknownProductTitle = "error.unknown_product_title",
    ErrorUnknownProductBody = "error.unknown_product_body",
    ErrorSoldOutTitle = "error.sold_out_title",
    ErrorSoldOutBody = "error.sold_out_body",
    ErrorRateLimitedTitle = "error.rate_limited_title",
    ErrorRateLimitedBody = "error.rate_limited_body",
    ChallengeTitle = "challenge.title",
    ChallengeBody = "challenge.body",
    ChallengeWorking = "challenge.working",
    ChallengeProgress = "challenge.progress",
    ChallengeDone = "challenge.done",
    ChallengeFailed = "challenge.failed",
    ChallengeRefused = "challenge.refused",
    ChallengeNoJsHeading = "challenge.nojs_heading",
    ChallengeNoJsBody = "challenge.nojs_body",
    ChallengeTooEarly = "challenge.too_early",
    ChallengeContinue = "challenge.continue",
    ErrorTooManyOpenTitle = "error.too_many_open_title",
    ErrorTooManyOpenBody = "error.too_many_open_body",
    ErrorUnavailableTitle = "error.unavailable_title",
    ErrorUnavailableBody = "error.unavailable_body",
    ErrorPaymentFailedTitle = "error.payment_failed_title",
    ErrorPaymentFailedBody = "error.payment_failed_body",
    ErrorForbiddenTitle = "error.forbidden_title",
    ErrorForbiddenBody = "error.forbidden_body",
    ErrorBadRequestTitle = "error.bad_request_title",
    ErrorBadRequestBody = "error.bad_request_body",
    ErrorMethodTitle = "error.method_title",
    ErrorMethodBody = "error.method_body",
    SiteFindOrder = "site.find_order",
    FindTitle = "find.title",
    FindIntro = "find.intro",
    FindSubmit = "find.submit",
    FindBadEmail = "find.bad_email",
    FindSent = "find.sent",
    FindSentHint = "find.sent_hint",
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use http::HeaderValue;

    use super::*;

    fn placeholders(text: &str) -> BTreeSet<String> {
        text.split('{').skip(1).filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_string())).collect()
    }

    #[test]
    fn every_message_exists_in_every_language_with_the_same_placeholders() {
        let catalogs = [(Lang::En, parse_catalog(EN_TOML).unwrap()), (Lang::ZhCn, parse_catalog(ZH_CN_TOML).unwrap())];
        let known: BTreeSet<&str> = Msg::ALL.iter().map(|m| m.key()).collect();
        assert_eq!(known.len(), Msg::ALL.len(), "two messages share a key");
        for (lang, catalog) in &catalogs {
            for msg in Msg::ALL {
                let text = catalog.get(msg.key()).unwrap_or_else(|| panic!("{} lacks {}", lang.tag(), msg.key()));
                assert!(!text.trim().is_empty(), "{} {} is empty", lang.tag(), msg.key());
                let en = catalogs[0].1.get(msg.key()).unwrap();
                assert_eq!(placeholders(text), placeholders(en), "{} {} placeholders", lang.tag(), msg.key());
            }
            let unused: Vec<&String> = catalog.keys().filter(|k| !known.contains(k.as_str())).collect();
            assert!(unused.is_empty(), "{} has keys no page uses: {unused:?}", lang.tag());
        }
    }

    #[test]
    fn translations_are_really_translated() {
        assert_eq!(Lang::En.t(Msg::StockOut), "Sold out");
        assert_eq!(Lang::ZhCn.t(Msg::StockOut), "已售罄");
        assert_eq!(Lang::ZhCn.f(Msg::StockLow, &[("n", "3")]), "仅剩 3 件");
    }

    #[test]
    fn accept_language_is_negotiated_with_q_values() {
        let lang = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(v));
            negotiate(&h)
        };
        assert_eq!(negotiate(&HeaderMap::new()), Lang::En);
        assert_eq!(lang("zh-CN,zh;q=0.9,en;q=0.8"), Lang::ZhCn);
        assert_eq!(lang("zh-Hans-CN"), Lang::ZhCn);
        assert_eq!(lang("fr, en-GB;q=0.5"), Lang::En);
        assert_eq!(lang("en;q=0.5, zh;q=0.9"), Lang::ZhCn);
        assert_eq!(lang("zh;q=0, en"), Lang::En);
        assert_eq!(lang("fr, de"), Lang::En);
        assert_eq!(lang("zh;q=banana"), Lang::En);
        assert_eq!(lang(";;;,,,=q"), Lang::En);
        assert_eq!(Lang::from_tag("ZH-cn"), Some(Lang::ZhCn));
        assert_eq!(Lang::from_tag("de"), None);
    }
}
