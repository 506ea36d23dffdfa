//! The storefront's HTML, as maud templates: every interpolated value is escaped by the template
//! engine, no template holds user-visible text (it all comes from the catalogs), and no element
//! carries inline script or style, so the strict Content-Security-Policy holds.

use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::i18n::{Lang, Msg};

/// What every page shares: the language, and where the language switch links point.
pub struct Chrome {
    pub lang: Lang,
    /// A same-origin path (with query) that shows this page again; `lang=` is appended to it.
    pub switch_base: String,
    /// Lab (sandbox) payments run beside real ones: every page says so.
    pub lab_notice: bool,
}

impl Chrome {
    pub(super) fn t(&self, msg: Msg) -> &'static str {
        self.lang.t(msg)
    }

    fn switch_link(&self, lang: Lang) -> String {
        let sep = if self.switch_base.contains('?') { '&' } else { '?' };
        format!("{}{sep}lang={}", self.switch_base, lang.tag())
    }
}

/// How the page asks to be refreshed while it waits for something.
pub struct Poll {
    pub order_id: String,
    pub status: &'static str,
    pub every_ms: u32,
    /// Fallback without JavaScript (`<noscript><meta http-equiv=refresh>`).
    pub refresh_secs: u32,
}

pub(super) fn layout(c: &Chrome, title: &str, poll: Option<&Poll>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang=(c.lang.tag()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · " (c.t(Msg::SiteName)) }
                link rel="icon" href="data:,";
                link rel="stylesheet" href=(assets::url(&assets::CSS));
                script src=(assets::url(&assets::JS)) defer {}
                @if let Some(poll) = poll {
                    noscript { meta http-equiv="refresh" content=(poll.refresh_secs); }
                }
            }
            body {
                a.skip href="#main" { (c.t(Msg::SiteSkip)) }
                header.site {
                    div.wrap {
                        a.brand href="/" { (c.t(Msg::SiteName)) }
                        nav.lang aria-label=(c.t(Msg::SiteLanguage)) {
                            ul {
                                @for lang in Lang::ALL {
                                    li {
                                        a href=(c.switch_link(lang)) lang=(lang.tag()) hreflang=(lang.tag())
                                            aria-current=[(lang == c.lang).then_some("true")] {
                                            (lang.native_name())
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                @if c.lab_notice {
                    p.notice.warn #lab-payments role="note" { (c.t(Msg::SiteLabPayments)) }
                }
                main #main .wrap
                    data-poll-order=[poll.map(|p| p.order_id.as_str())]
                    data-poll-status=[poll.map(|p| p.status)]
                    data-poll-ms=[poll.map(|p| p.every_ms)] {
                    (body)
                }
                footer.site {
                    div.wrap {
                        (c.t(Msg::SiteFooter)) " "
                        a #find-order-link href="/find-order" { (c.t(Msg::SiteFindOrder)) }
                    }
                }
            }
        }
    }
}

/// Stock as a buyer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockState {
    In,
    Low(usize),
    Out,
}

impl StockState {
    pub const LOW_AT: usize = 5;

    pub fn of(stock: usize) -> StockState {
        match stock {
            0 => StockState::Out,
            n if n <= Self::LOW_AT => StockState::Low(n),
            _ => StockState::In,
        }
    }
}

fn stock_badge(lang: Lang, stock: StockState) -> Markup {
    match stock {
        StockState::In => html! { span.stock.in { (lang.t(Msg::StockIn)) } },
        StockState::Low(n) => html! { span.stock.low { (lang.f(Msg::StockLow, &[("n", &n.to_string())])) } },
        StockState::Out => html! { span.stock.out { (lang.t(Msg::StockOut)) } },
    }
}

pub struct ProductCard {
    pub sku: String,
    pub title: String,
    pub price: String,
    pub stock: StockState,
    /// Some enabled payment channel serves one of its currencies; else no Buy, a short note.
    pub purchasable: bool,
}

pub fn product_list(c: &Chrome, products: &[ProductCard]) -> Markup {
    let body = html! {
        h1 { (c.t(Msg::ListTitle)) }
        p.tagline { (c.t(Msg::SiteTagline)) }
        @if products.is_empty() {
            p.notice { (c.t(Msg::ListEmpty)) }
        } @else {
            ul.products {
                @for p in products {
                    li.card.product {
                        h2 { a href=(format!("/p/{}", p.sku)) { (p.title) } }
                        span.price { (p.price) }
                        (stock_badge(c.lang, p.stock))
                        @if !p.purchasable {
                            span.muted.not-purchasable { (c.t(Msg::ProductNotPurchasable)) }
                        } @else if p.stock != StockState::Out {
                            a.button href=(format!("/p/{}", p.sku)) aria-label=(format!("{} – {}", c.t(Msg::ListView), p.title)) {
                                (c.t(Msg::ListView))
                            }
                        }
                    }
                }
            }
        }
    };
    layout(c, c.t(Msg::ListTitle), None, body)
}

/// The checkout form's values, echoed back when it has to be corrected.
#[derive(Debug, Clone, Default)]
pub struct FormValues {
    pub quantity: String,
    pub email: String,
    pub currency: Option<String>,
    pub channel: Option<String>,
}

pub struct ProductPage {
    pub card: ProductCard,
    /// (currency code, formatted unit price), in the product's order.
    pub prices: Vec<(String, String)>,
    pub preferred_currency: String,
    /// (channel name, label).
    pub channels: Vec<(String, String)>,
    pub max_quantity: u32,
    pub errors: Vec<String>,
    pub form: FormValues,
}

pub fn product_page(c: &Chrome, page: &ProductPage) -> Markup {
    let p = &page.card;
    let chosen_currency = page.form.currency.clone().unwrap_or_else(|| page.preferred_currency.clone());
    let chosen_channel = page.form.channel.clone().or_else(|| page.channels.first().map(|(name, _)| name.clone()));
    let quantity = if page.form.quantity.is_empty() { "1".to_string() } else { page.form.quantity.clone() };
    let body = html! {
        h1 { (p.title) }
        dl.summary {
            dt { (c.t(Msg::ProductPrice)) }
            dd.price { (p.price) }
        }
        p { (stock_badge(c.lang, p.stock)) }
        @if !p.purchasable {
            p.notice.not-purchasable { (c.t(Msg::ProductNotPurchasable)) }
            p { a href="/" { (c.t(Msg::SiteAllProducts)) } }
        } @else if p.stock == StockState::Out {
            p.notice.warn { (c.t(Msg::ProductSoldOutBody)) }
            p { a href="/" { (c.t(Msg::SiteAllProducts)) } }
        } @else {
            h2 #checkout { (c.t(Msg::CheckoutHeading)) }
            @if !page.errors.is_empty() {
                div.errors role="alert" {
                    h2 { (c.t(Msg::CheckoutErrorsHeading)) }
                    ul { @for e in &page.errors { li { (e) } } }
                }
            }
            form.card method="post" action="/checkout" {
                input type="hidden" name="sku" value=(p.sku);
                div.field {
                    label for="quantity" { (c.t(Msg::CheckoutQuantity)) }
                    input #quantity type="number" name="quantity" min="1" max=(page.max_quantity) step="1"
                        inputmode="numeric" required value=(quantity) aria-describedby="quantity-hint";
                    p.hint #quantity-hint {
                        (c.lang.f(Msg::CheckoutQuantityHint, &[("max", &page.max_quantity.to_string())]))
                    }
                }
                div.field {
                    label for="email" { (c.t(Msg::CheckoutEmail)) }
                    input #email type="email" name="email" autocomplete="email" maxlength="254"
                        value=(page.form.email) aria-describedby="email-hint";
                    p.hint #email-hint { (c.t(Msg::CheckoutEmailHint)) }
                }
                @if page.prices.len() > 1 {
                    div.field {
                        label for="currency" { (c.t(Msg::CheckoutCurrency)) }
                        select #currency name="currency" {
                            @for (code, price) in &page.prices {
                                option value=(code) selected[*code == chosen_currency] { (code) " – " (price) }
                            }
                        }
                    }
                } @else if let Some((code, _)) = page.prices.first() {
                    input type="hidden" name="currency" value=(code);
                }
                fieldset {
                    legend { (c.t(Msg::CheckoutChannel)) }
                    @for (name, label) in &page.channels {
                        label {
                            input type="radio" name="channel" value=(name) required
                                checked[chosen_channel.as_deref() == Some(name.as_str())];
                            span { (label) }
                        }
                    }
                }
                button.wide type="submit" { (c.t(Msg::CheckoutSubmit)) }
            }
        }
    };
    layout(c, &p.title, None, body)
}

pub struct PayPage {
    pub order_id: String,
    pub token: String,
    pub item: String,
    pub amount: String,
    pub expires: String,
}

pub fn sandbox_pay_page(c: &Chrome, page: &PayPage) -> Markup {
    let body = html! {
        h1 { (c.t(Msg::PayTitle)) }
        p.notice.warn { (c.t(Msg::PaySandboxNotice)) }
        dl.summary {
            dt { (c.t(Msg::OrderItem)) }
            dd { (page.item) }
            dt { (c.t(Msg::PayAmount)) }
            dd.price { (page.amount) }
        }
        p.muted { (c.lang.f(Msg::PayReservedUntil, &[("time", &page.expires)])) }
        form method="post" action=(format!("/pay/sandbox/{}", page.order_id)) {
            input type="hidden" name="token" value=(page.token);
            button #pay.wide type="submit" { (c.lang.f(Msg::PayButton, &[("amount", &page.amount)])) }
        }
    };
    layout(c, c.t(Msg::PayTitle), None, body)
}

pub enum OrderState {
    Reserved {
        expires: String,
        pay_link: Option<String>,
    },
    Delivered {
        keys: Vec<String>,
        delivered_at: Option<String>,
    },
    Expired {
        product_link: String,
    },
    PaidAwaitingStock,
    /// Refunded: the keys were revoked and are not shown.
    Refunded,
}

impl OrderState {
    fn status(&self) -> (&'static str, Msg) {
        match self {
            OrderState::Reserved { .. } => ("reserved", Msg::StatusReserved),
            OrderState::Delivered { .. } => ("delivered", Msg::StatusDelivered),
            OrderState::Expired { .. } => ("expired", Msg::StatusExpired),
            OrderState::PaidAwaitingStock => ("paid_awaiting_stock", Msg::StatusPaidAwaitingStock),
            OrderState::Refunded => ("refunded", Msg::StatusRefunded),
        }
    }
}

pub struct OrderPage {
    pub order_id: String,
    pub item: String,
    pub quantity: u32,
    pub total: String,
    pub state: OrderState,
    /// Shown through a return link: until when (UTC) that link works.
    pub return_link_until: Option<String>,
}

pub fn order_page(c: &Chrome, page: &OrderPage) -> Markup {
    let (status, status_msg) = page.state.status();
    let poll = match &page.state {
        OrderState::Reserved { .. } => {
            Some(Poll { order_id: page.order_id.clone(), status, every_ms: 3000, refresh_secs: 10 })
        }
        OrderState::PaidAwaitingStock => {
            Some(Poll { order_id: page.order_id.clone(), status, every_ms: 10_000, refresh_secs: 30 })
        }
        _ => None,
    };
    let body = html! {
        h1 { (c.t(Msg::OrderTitle)) }
        dl.summary {
            dt { (c.t(Msg::OrderStatus)) }
            dd { span #status .badge .(status) { (c.t(status_msg)) } }
            dt { (c.t(Msg::OrderItem)) }
            dd { (page.item) }
            dt { (c.t(Msg::OrderQuantity)) }
            dd { (page.quantity) }
            dt { (c.t(Msg::OrderTotal)) }
            dd { (page.total) }
            dt { (c.t(Msg::OrderNumber)) }
            dd.mono { (page.order_id) }
        }
        @match &page.state {
            OrderState::Reserved { expires, pay_link } => {
                p.notice { (c.lang.f(Msg::OrderReservedBody, &[("time", expires)])) }
                @if let Some(link) = pay_link {
                    p.actions { a.button #pay-now href=(link) { (c.t(Msg::OrderPayNow)) } }
                }
                p.muted { (c.t(Msg::OrderAutoRefresh)) }
            }
            OrderState::Delivered { keys, delivered_at } => {
                h2 { (c.t(Msg::OrderKeysHeading)) }
                ul.keys #keys {
                    @for (i, key) in keys.iter().enumerate() {
                        li.key {
                            code #(format!("key-{i}")) { (key) }
                            button.secondary type="button" data-copy=(format!("key-{i}"))
                                data-copied=(c.t(Msg::OrderCopied)) hidden { (c.t(Msg::OrderCopy)) }
                        }
                    }
                }
                @if let Some(at) = delivered_at {
                    p.muted { (c.lang.f(Msg::OrderDeliveredAt, &[("time", at)])) }
                }
                p.notice.warn { (c.t(Msg::OrderKeepPrivate)) }
            }
            OrderState::Expired { product_link } => {
                p.notice.bad { (c.t(Msg::OrderExpiredBody)) }
                p.actions { a.button href=(product_link) { (c.t(Msg::OrderNewOrder)) } }
            }
            OrderState::PaidAwaitingStock => {
                p.notice.warn { (c.t(Msg::OrderAwaitingBody)) }
                p.muted { (c.t(Msg::OrderAutoRefresh)) }
            }
            OrderState::Refunded => {
                p.notice { (c.t(Msg::OrderRefundedBody)) }
            }
        }
        @if let Some(until) = &page.return_link_until {
            p.notice.warn #return-link { (c.lang.f(Msg::OrderReturnLinkUntil, &[("time", until)])) }
        } @else {
            p.muted { (c.t(Msg::OrderBookmark)) }
        }
    };
    layout(c, c.t(Msg::OrderTitle), poll.as_ref(), body)
}

pub struct ErrorPage {
    pub title: Msg,
    pub body: String,
    /// (href, label)
    pub links: Vec<(String, &'static str)>,
}

pub fn error_page(c: &Chrome, page: &ErrorPage) -> Markup {
    let body = html! {
        h1 #error-title { (c.t(page.title)) }
        p.notice.bad #error-body { (page.body) }
        p.actions {
            @for (href, label) in &page.links {
                a.button.secondary href=(href) { (label) }
            }
            a.button href="/" { (c.t(Msg::ErrorHome)) }
        }
    };
    layout(c, c.t(page.title), None, body)
}

/// What the "find my order" page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindOrderState {
    /// The form.
    Ask,
    /// The form again, with what was wrong with the address.
    BadAddress { email: String },
    /// The answer, the same whether or not orders exist.
    Sent,
}

pub fn find_order_page(c: &Chrome, state: &FindOrderState) -> Markup {
    let body = html! {
        h1 { (c.t(Msg::FindTitle)) }
        @if *state == FindOrderState::Sent {
            p.notice #find-order-sent role="status" { (c.t(Msg::FindSent)) }
            p { (c.t(Msg::FindSentHint)) }
        } @else {
            p { (c.t(Msg::FindIntro)) }
            @if let FindOrderState::BadAddress { .. } = state {
                p.notice.bad #find-order-error role="alert" { (c.t(Msg::FindBadEmail)) }
            }
            form.card method="post" action="/find-order" {
                div.field {
                    label for="email" { (c.t(Msg::CheckoutEmail)) }
                    input #email type="email" name="email" autocomplete="email" maxlength="254" required
                        value=[match state { FindOrderState::BadAddress { email } => Some(email.as_str()), _ => None }];
                }
                button.wide type="submit" { (c.t(Msg::FindSubmit)) }
            }
        }
    };
    layout(c, c.t(Msg::FindTitle), None, body)
}
