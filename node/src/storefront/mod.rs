//! The buyer's web pages (DESIGN §6 "An HTML storefront at `/`"), served by the node itself.
//!
//! Server-rendered HTML that works without JavaScript, in the buyer's language (`?lang=` link,
//! then the `lang` cookie, then `Accept-Language`), over the same engine, limiter classes and
//! payment path as the JSON API. Routes:
//!
//! | route | page |
//! |---|---|
//! | `GET /` | product list |
//! | `GET /p/{sku}` | product and checkout form |
//! | `POST /checkout` | creates the order, 303 to the pay page; or the challenge page (428) |
//! | `GET /pay/sandbox/{id}?token=` | the sandbox's pay page |
//! | `POST /pay/sandbox/{id}` (form) | pays, 303 to the order page (routed here by `api.rs`) |
//! | `GET /order/{id}?token=` | status, and the keys once delivered |
//! | `GET /order/{id}/return/{return token}` | the same, where Stripe and EPay send the buyer back |
//! | `GET /static/app.{hash}.css\|js` | assets, cached for a year (and `pow-worker.{hash}.js`) |
//! | `GET /find-order`, `POST /find-order` (form) | "find my order": mails an address links to its orders |
//!
//! Pages that carry or show a token are `no-store`; every HTML page has a strict CSP, no
//! inline script, `Referrer-Policy: no-referrer` and `X-Frame-Options: DENY`. Nothing here logs a
//! path, a query string or a token. Decisions are written down in `docs/storefront.md`.

pub mod assets;
mod challenge;
pub mod form;
pub mod i18n;
pub mod money;
pub mod pages;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use edgecard_protocol::{OrderId, OrderToken, Sku};
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;

use crate::api::{HttpResponse, NodeApi};
use crate::config::{Currency, PriceConfig, ProductConfig};
use crate::limiter::LimitClass;
use crate::orders::{CreateOrder, FindRefusal, OrderError, OrderRecord, OrderStatus};
use crate::payments::return_link::ReturnLinkError;
use crate::payments::router::RouteError;
use crate::payments::{sandbox, LabPayments};
use crate::time_fmt::rfc3339;

use self::i18n::{Lang, Msg};
use self::pages::{
    Chrome, ErrorPage, FindOrderState, FormValues, OrderPage, OrderState, PayPage, ProductCard, StockState,
};

/// The Content-Security-Policy of every HTML page.
pub const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";
/// Catalog pages: like `GET /api/v1/products`, fresh within seconds even through a CDN.
const CATALOG_CACHE: &str = "public, max-age=2, stale-while-revalidate=30";
const ASSET_CACHE: &str = "public, max-age=31536000, immutable";
const NO_STORE: &str = "no-store";
const LANG_COOKIE: &str = "lang";
/// A year: the language choice sticks.
const LANG_COOKIE_MAX_AGE: u64 = 365 * 24 * 3600;
/// How long a form body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest quantity the form offers; the engine's `orders.max_quantity` is the real bound and
/// its refusal names it.
const FORM_MAX_QUANTITY: u32 = 10;
/// Retry-After of the per-address cap on unpaid orders (the API's value).
const TOO_MANY_OPEN_RETRY_SECS: u64 = 60;
const UNAVAILABLE_RETRY_SECS: u64 = 5;

/// The request's language, and whether the buyer just chose it (so the cookie must be set).
struct Ctx {
    lang: Lang,
    chose_lang: bool,
    client: IpAddr,
    /// Lab payments beside real ones: every page carries the notice.
    lab_notice: bool,
}

impl Ctx {
    fn new(api: &NodeApi, parts: &Parts, query: &[(String, String)], client: IpAddr) -> Ctx {
        let chosen = form::first(query, "lang").and_then(Lang::from_tag);
        let lang = chosen
            .or_else(|| form::cookie(&parts.headers, LANG_COOKIE).and_then(Lang::from_tag))
            .unwrap_or_else(|| i18n::negotiate(&parts.headers));
        let lab_notice = api.lab == LabPayments::BesideRealChannels;
        Ctx { lang, chose_lang: chosen.is_some(), client, lab_notice }
    }

    fn chrome(&self, switch_base: impl Into<String>) -> Chrome {
        Chrome { lang: self.lang, switch_base: switch_base.into(), lab_notice: self.lab_notice }
    }
}

/// Whether a sandbox pay request is a browser form, which the storefront answers (with a 303 to
/// the order page) instead of the JSON API.
pub fn is_browser_form(headers: &HeaderMap) -> bool {
    form::is_form(headers)
}

/// Every non-API path of the buyer listener.
pub async fn handle<B>(api: &NodeApi, request: Request<B>, client: IpAddr) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    let query = form::parse_urlencoded(parts.uri.query().unwrap_or(""));
    let ctx = Ctx::new(api, &parts, &query, client);
    let path = parts.uri.path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let read = parts.method == Method::GET || parts.method == Method::HEAD;
    let response = match (read, &parts.method, segments.as_slice()) {
        (true, _, [""]) => product_list(api, &ctx, &query),
        (true, _, ["p", sku]) => product(api, &ctx, &query, sku),
        (_, &Method::POST, ["checkout"]) => checkout(api, &ctx, &parts, body).await,
        (true, _, ["pay", "sandbox", id]) => sandbox_pay_page(api, &ctx, &query, id).await,
        (true, _, ["order", id]) => order(api, &ctx, &query, id).await,
        (true, _, ["order", id, "return", return_token]) => order_return(api, &ctx, id, return_token).await,
        (true, _, ["static", name]) => static_asset(name),
        (true, _, ["find-order"]) => html(
            &ctx,
            StatusCode::OK,
            NO_STORE,
            pages::find_order_page(&ctx.chrome("/find-order"), &FindOrderState::Ask),
        ),
        (_, &Method::POST, ["find-order"]) => find_order(api, &ctx, &parts, body).await,
        (
            _,
            _,
            [""]
            | ["p", _]
            | ["checkout"]
            | ["pay", "sandbox", _]
            | ["order", _]
            | ["order", _, "return", _]
            | ["static", _]
            | ["find-order"],
        ) => {
            let mut response = error(&ctx, StatusCode::METHOD_NOT_ALLOWED, Msg::ErrorMethodTitle, Msg::ErrorMethodBody);
            let allow = match segments.as_slice() {
                ["checkout"] => "POST",
                ["find-order"] => "GET, HEAD, POST",
                _ => "GET, HEAD",
            };
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        _ => error(&ctx, StatusCode::NOT_FOUND, Msg::ErrorNotFoundTitle, Msg::ErrorNotFoundBody),
    };
    finish(&ctx, response)
}

/// `POST /find-order`: "find my order". The same page whether or not the address has orders here
/// or anywhere (see `docs/mail.md`); only a malformed address (400) or a client over its budget
/// (429) is told apart.
async fn find_order<B>(api: &NodeApi, ctx: &Ctx, parts: &Parts, body: B) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if is_cross_site(&parts.headers, &parts.uri, &api.public_url) {
        return error(ctx, StatusCode::FORBIDDEN, Msg::ErrorForbiddenTitle, Msg::ErrorForbiddenBody);
    }
    if !form::is_form(&parts.headers) {
        return error(ctx, StatusCode::UNSUPPORTED_MEDIA_TYPE, Msg::ErrorBadRequestTitle, Msg::ErrorBadRequestBody);
    }
    let fields = match read_form(api, ctx, body).await {
        Ok(fields) => fields,
        Err(response) => return *response,
    };
    let email = form::first(&fields, "email").unwrap_or("");
    let chrome = ctx.chrome("/find-order");
    match api.engine.find_orders(email, ctx.lang, ctx.client) {
        Ok(()) => html(ctx, StatusCode::OK, NO_STORE, pages::find_order_page(&chrome, &FindOrderState::Sent)),
        Err(FindRefusal::BadAddress) => {
            let state = FindOrderState::BadAddress { email: email.chars().take(254).collect() };
            html(ctx, StatusCode::BAD_REQUEST, NO_STORE, pages::find_order_page(&chrome, &state))
        }
        Err(FindRefusal::RateLimited(limited)) => {
            let secs = limited.retry_after_secs();
            let body = ctx.lang.f(Msg::ErrorRateLimitedBody, &[("secs", &secs.to_string())]);
            let page = error_page_for(Msg::ErrorRateLimitedTitle, body);
            html(ctx, StatusCode::TOO_MANY_REQUESTS, NO_STORE, pages::error_page(&ctx.chrome("/"), &page))
                .with_retry_after(secs)
        }
    }
}

/// `POST /pay/sandbox/{id}` from the pay page's form: pays through the same signed-callback path
/// as the API, then sends the buyer to the order page.
pub async fn sandbox_pay_form<B>(api: &NodeApi, request: Request<B>, client: IpAddr, id: &str) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    let query = form::parse_urlencoded(parts.uri.query().unwrap_or(""));
    let ctx = Ctx::new(api, &parts, &query, client);
    let response = sandbox_pay(api, &ctx, &parts, body, id).await;
    finish(&ctx, response)
}

async fn sandbox_pay<B>(api: &NodeApi, ctx: &Ctx, parts: &Parts, body: B, id: &str) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if is_cross_site(&parts.headers, &parts.uri, &api.public_url) {
        return error(ctx, StatusCode::FORBIDDEN, Msg::ErrorForbiddenTitle, Msg::ErrorForbiddenBody);
    }
    if let Some(response) = limit(api, ctx, LimitClass::Payment) {
        return response;
    }
    if api.sandbox.is_none() {
        return error(ctx, StatusCode::NOT_FOUND, Msg::ErrorNotFoundTitle, Msg::ErrorNotFoundBody);
    }
    let fields = match read_form(api, ctx, body).await {
        Ok(fields) => fields,
        Err(response) => return *response,
    };
    let (id, token, record) = match authorize(api, ctx, id, form::first(&fields, "token")).await {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let Ok(order_token) = token.parse::<OrderToken>() else {
        return error(ctx, StatusCode::NOT_FOUND, Msg::ErrorUnknownOrderTitle, Msg::ErrorUnknownOrderBody);
    };
    if matches!(record.status, OrderStatus::Reserved | OrderStatus::Expired)
        && api.sandbox_pay(&id, &order_token).await.is_err()
    {
        let mut page = error_page_for(Msg::ErrorPaymentFailedTitle, ctx.lang.t(Msg::ErrorPaymentFailedBody));
        page.links.push((pay_path(&id, &token), ctx.lang.t(Msg::ErrorTryAgain)));
        return html(ctx, StatusCode::SERVICE_UNAVAILABLE, NO_STORE, pages::error_page(&ctx.chrome("/"), &page))
            .with_retry_after(UNAVAILABLE_RETRY_SECS);
    }
    see_other(&order_path(&id, &token))
}

/// Adds the language cookie when the buyer just chose a language; such a response is personal,
/// so it is never cached.
fn finish(ctx: &Ctx, mut response: HttpResponse) -> HttpResponse {
    if ctx.chose_lang {
        let cookie = format!(
            "{LANG_COOKIE}={}; Path=/; Max-Age={LANG_COOKIE_MAX_AGE}; HttpOnly; Secure; SameSite=Lax",
            ctx.lang.tag()
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_STORE));
    }
    response
}

fn product_list(api: &NodeApi, ctx: &Ctx, query: &[(String, String)]) -> HttpResponse {
    if let Some(response) = limit(api, ctx, LimitClass::Catalog) {
        return response;
    }
    let wanted = wanted_currency(ctx.lang, query);
    let cards: Vec<ProductCard> = api.engine.catalog().all().iter().map(|p| card(api, ctx.lang, p, wanted)).collect();
    html(ctx, StatusCode::OK, CATALOG_CACHE, pages::product_list(&ctx.chrome("/"), &cards))
}

fn product(api: &NodeApi, ctx: &Ctx, query: &[(String, String)], sku: &str) -> HttpResponse {
    if let Some(response) = limit(api, ctx, LimitClass::Catalog) {
        return response;
    }
    let Some(product) = Sku::new(sku).ok().and_then(|sku| api.engine.catalog().get(&sku)) else {
        return error(ctx, StatusCode::NOT_FOUND, Msg::ErrorUnknownProductTitle, Msg::ErrorUnknownProductBody);
    };
    let wanted = wanted_currency(ctx.lang, query);
    let page = product_view(api, ctx.lang, &product, wanted, Vec::new(), FormValues::default());
    let chrome = ctx.chrome(format!("/p/{}", product.sku));
    html(ctx, StatusCode::OK, CATALOG_CACHE, pages::product_page(&chrome, &page))
}

fn product_view(
    api: &NodeApi,
    lang: Lang,
    product: &ProductConfig,
    wanted: Option<Currency>,
    errors: Vec<String>,
    form: FormValues,
) -> pages::ProductPage {
    let card = card(api, lang, product, wanted);
    let payable = payable_prices(api, product);
    let prices = payable
        .iter()
        .map(|p| (p.currency.to_string(), money::format_price(p.amount_minor, p.currency.as_str(), lang)))
        .collect();
    let preferred_currency = wanted
        .filter(|c| payable.iter().any(|p| p.currency == *c))
        .or_else(|| payable.first().map(|p| p.currency))
        .map(|c| c.to_string())
        .unwrap_or_default();
    let stock = api.engine.stock(&product.sku);
    let max_quantity = FORM_MAX_QUANTITY.min(u32::try_from(stock).unwrap_or(u32::MAX)).max(1);
    let channels = channels(api, lang, &payable);
    pages::ProductPage { card, prices, preferred_currency, channels, max_quantity, errors, form }
}

/// The product's prices in currencies that some enabled channel serves: the ones a buyer can pay.
fn payable_prices<'a>(api: &NodeApi, product: &'a ProductConfig) -> Vec<&'a PriceConfig> {
    product.prices.iter().filter(|p| !api.router.offered(p.currency.as_str()).is_empty()).collect()
}

/// The buyer's currency: `?currency=` if given, else the usual one for the language.
fn wanted_currency(lang: Lang, query: &[(String, String)]) -> Option<Currency> {
    form::first(query, "currency").and_then(|c| c.to_ascii_uppercase().parse().ok()).or_else(|| {
        match lang {
            Lang::En => "USD",
            Lang::ZhCn => "CNY",
        }
        .parse()
        .ok()
    })
}

fn title_of(product: &ProductConfig, lang: Lang) -> String {
    product
        .title
        .get(lang.tag())
        .or_else(|| product.title.get("en"))
        .cloned()
        .unwrap_or_else(|| product.sku.to_string())
}

fn card(api: &NodeApi, lang: Lang, product: &ProductConfig, wanted: Option<Currency>) -> ProductCard {
    let price = wanted
        .and_then(|c| product.prices.iter().find(|p| p.currency == c))
        .or_else(|| product.prices.first())
        .map(|p| money::format_price(p.amount_minor, p.currency.as_str(), lang))
        .unwrap_or_default();
    ProductCard {
        sku: product.sku.to_string(),
        title: title_of(product, lang),
        price,
        stock: StockState::of(api.engine.stock(&product.sku)),
        purchasable: !payable_prices(api, product).is_empty(),
    }
}

/// The channels a buyer may pick for one of `prices`' currencies, sorted by name, with their
/// labels. (Which of them takes which currency is checked again at checkout.)
fn channels(api: &NodeApi, lang: Lang, prices: &[&PriceConfig]) -> Vec<(String, String)> {
    let mut names: Vec<&'static str> = prices.iter().flat_map(|p| api.router.offered(p.currency.as_str())).collect();
    names.sort_unstable();
    names.dedup();
    names.into_iter().map(|name| (name.to_string(), channel_label(name, lang))).collect()
}

fn channel_label(name: &str, lang: Lang) -> String {
    match name {
        sandbox::NAME => lang.t(Msg::ChannelSandbox).to_string(),
        "stripe" => lang.t(Msg::ChannelStripe).to_string(),
        "epay" => lang.t(Msg::ChannelEpay).to_string(),
        other => other.to_string(),
    }
}

async fn checkout<B>(api: &NodeApi, ctx: &Ctx, parts: &Parts, body: B) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if is_cross_site(&parts.headers, &parts.uri, &api.public_url) {
        return error(ctx, StatusCode::FORBIDDEN, Msg::ErrorForbiddenTitle, Msg::ErrorForbiddenBody);
    }
    if let Some(response) = limit(api, ctx, LimitClass::CreateOrder) {
        return response;
    }
    if !form::is_form(&parts.headers) {
        return error(ctx, StatusCode::UNSUPPORTED_MEDIA_TYPE, Msg::ErrorBadRequestTitle, Msg::ErrorBadRequestBody);
    }
    let fields = match read_form(api, ctx, body).await {
        Ok(fields) => fields,
        Err(response) => return *response,
    };
    let form::CheckoutForm { sku, values } = form::checkout_form(&fields);
    let Some(product) = sku.and_then(|sku| api.engine.catalog().get(&sku)) else {
        return error(ctx, StatusCode::NOT_FOUND, Msg::ErrorUnknownProductTitle, Msg::ErrorUnknownProductBody);
    };
    let lang = ctx.lang;
    let retry = |errors: Vec<String>, values: FormValues| {
        let wanted = values.currency.as_deref().and_then(|c| c.parse().ok());
        let page = product_view(api, lang, &product, wanted, errors, values);
        let chrome = ctx.chrome(format!("/p/{}", product.sku));
        html(ctx, StatusCode::BAD_REQUEST, NO_STORE, pages::product_page(&chrome, &page))
    };
    let quantity_error = |max: u32| lang.f(Msg::CheckoutErrorQuantity, &[("max", &max.to_string())]);

    let mut errors = Vec::new();
    let quantity = values.quantity.parse::<u32>().ok().filter(|q| *q >= 1);
    if quantity.is_none() {
        errors.push(quantity_error(FORM_MAX_QUANTITY));
    }
    let payable = payable_prices(api, &product);
    let currency = match values.currency.as_deref().filter(|c| !c.is_empty()) {
        None => {
            let first = payable.first().map(|p| p.currency);
            if first.is_none() {
                // No channel serves any of the product's currencies (the page hides Buy).
                errors.push(lang.t(Msg::CheckoutErrorCurrency).to_string());
            }
            first
        }
        Some(c) => match c.parse::<Currency>() {
            Ok(c) if payable.iter().any(|p| p.currency == c) => Some(c),
            _ => {
                errors.push(lang.t(Msg::CheckoutErrorCurrency).to_string());
                None
            }
        },
    };
    let email = Some(values.email.clone()).filter(|e| !e.is_empty());
    let (Some(quantity), true) = (quantity, errors.is_empty()) else {
        return retry(errors, values);
    };
    // The same route as the API: the order's currency picks the channels, unless the buyer chose.
    let order_currency = currency.or_else(|| product.prices.first().map(|p| p.currency)).map(|c| c.to_string());
    let requested = values.channel.as_deref().filter(|c| !c.is_empty());
    let plan = match api.router.plan(order_currency.as_deref().unwrap_or(""), requested) {
        Ok(plan) => plan,
        Err(RouteError::UnknownChannel(_) | RouteError::ChannelNotOffered { .. }) => {
            return retry(vec![lang.t(Msg::CheckoutErrorChannel).to_string()], values)
        }
        Err(RouteError::NoChannelForCurrency(_)) => {
            return retry(vec![lang.t(Msg::CheckoutErrorCurrency).to_string()], values)
        }
        Err(RouteError::AllUnavailable { retry_after_secs }) => return unavailable(ctx, retry_after_secs),
    };
    // A suspicious client, or a flash sale: the challenge page instead (after the form's checks,
    // so a buyer fixes typos before doing any work).
    if let Some(response) = challenge::gate(api, ctx, &product.sku, &fields, &values) {
        return response;
    }

    let created = api
        .engine
        .create_order_in(
            CreateOrder {
                sku: product.sku.clone(),
                quantity,
                email,
                currency,
                channel: api.router.preferred(&plan).to_string(),
                client_ip: ctx.client,
            },
            Some(ctx.lang.tag()),
        )
        .await;
    let created = match created {
        Ok(created) => created,
        Err(OrderError::BadQuantity { max }) => return retry(vec![quantity_error(max)], values),
        Err(OrderError::BadEmail) => return retry(vec![lang.t(Msg::CheckoutErrorEmail).to_string()], values),
        Err(OrderError::UnsupportedCurrency { .. }) => {
            return retry(vec![lang.t(Msg::CheckoutErrorCurrency).to_string()], values)
        }
        Err(OrderError::UnknownChannel(_)) => {
            return retry(vec![lang.t(Msg::CheckoutErrorChannel).to_string()], values)
        }
        Err(e) => return engine_error(ctx, e, Some(&product.sku)),
    };
    // Opens the payment like the API does (falling through channels; cancelling the reservation
    // when none can take it).
    let id = created.record.id;
    let token = created.token.to_string();
    match api.open_payment(&created.record, &plan).await {
        Ok((channel, _)) if channel == sandbox::NAME && api.sandbox.is_some() => see_other(&pay_path(&id, &token)),
        // Hosted providers: the order page links to their pay page and keeps the way back.
        Ok(_) => see_other(&order_path(&id, &token)),
        Err(_) => unavailable(ctx, UNAVAILABLE_RETRY_SECS),
    }
}

/// 503 "temporarily unavailable, try again in N seconds".
fn unavailable(ctx: &Ctx, secs: u64) -> HttpResponse {
    let body = ctx.lang.f(Msg::ErrorUnavailableBody, &[("secs", &secs.to_string())]);
    let page = error_page_for(Msg::ErrorUnavailableTitle, body);
    html(ctx, StatusCode::SERVICE_UNAVAILABLE, NO_STORE, pages::error_page(&ctx.chrome("/"), &page))
        .with_retry_after(secs)
}

async fn sandbox_pay_page(api: &NodeApi, ctx: &Ctx, query: &[(String, String)], id: &str) -> HttpResponse {
    if let Some(response) = limit(api, ctx, LimitClass::OrderLookup) {
        return response;
    }
    if api.sandbox.is_none() {
        return error(ctx, StatusCode::NOT_FOUND, Msg::ErrorNotFoundTitle, Msg::ErrorNotFoundBody);
    }
    let (id, token, record) = match authorize(api, ctx, id, form::first(query, "token")).await {
        Ok(found) => found,
        Err(response) => return *response,
    };
    if record.status != OrderStatus::Reserved || record.channel != sandbox::NAME {
        return see_other(&order_path(&id, &token));
    }
    let title =
        api.engine.catalog().get(&record.sku).map_or_else(|| record.sku.to_string(), |p| title_of(&p, ctx.lang));
    let page = PayPage {
        order_id: id.to_string(),
        token: token.clone(),
        item: ctx.lang.f(Msg::PayItem, &[("qty", &record.quantity.to_string()), ("title", &title)]),
        amount: money::format_price(record.amount_minor, &record.currency, ctx.lang),
        expires: minutes(record.expires_at),
    };
    let chrome = ctx.chrome(pay_path(&id, &token));
    html(ctx, StatusCode::OK, NO_STORE, pages::sandbox_pay_page(&chrome, &page))
}

async fn order(api: &NodeApi, ctx: &Ctx, query: &[(String, String)], id: &str) -> HttpResponse {
    if let Some(response) = limit(api, ctx, LimitClass::OrderLookup) {
        return response;
    }
    let (id, token, record) = match authorize(api, ctx, id, form::first(query, "token")).await {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let page = order_page_of(api, ctx, &record, Some(&token), None);
    let chrome = ctx.chrome(order_path(&id, &token));
    html(ctx, StatusCode::OK, NO_STORE, pages::order_page(&chrome, &page))
}

/// `GET /order/{id}/return/{return token}`: where Stripe and EPay send the buyer back. The return
/// token (never the order's token, which must not reach a provider's logs) shows this one order
/// until it expires; the page says until when and to keep the order link. A wrong or foreign
/// token looks like an unknown order.
async fn order_return(api: &NodeApi, ctx: &Ctx, id: &str, return_token: &str) -> HttpResponse {
    if let Some(response) = limit(api, ctx, LimitClass::OrderLookup) {
        return response;
    }
    let not_found = || error(ctx, StatusCode::NOT_FOUND, Msg::ErrorUnknownOrderTitle, Msg::ErrorUnknownOrderBody);
    let Ok(id) = id.parse::<OrderId>() else { return not_found() };
    match api.return_links.verify(&id, return_token, crate::api::unix_secs()) {
        Ok(()) => {}
        Err(ReturnLinkError::Expired) => {
            return error(ctx, StatusCode::GONE, Msg::ErrorReturnExpiredTitle, Msg::ErrorReturnExpiredBody)
        }
        Err(ReturnLinkError::Malformed | ReturnLinkError::BadMac) => return not_found(),
    }
    let record = match api.engine.lookup_authorized(&id).await {
        Ok(record) => record,
        Err(e) => return engine_error(ctx, e, None),
    };
    let until = minutes(edgecard_protocol::UnixMillis(api.return_links.expires_at(&record).saturating_mul(1000)));
    let page = order_page_of(api, ctx, &record, None, Some(until));
    let chrome = ctx.chrome(format!("/order/{id}/return/{return_token}"));
    html(ctx, StatusCode::OK, NO_STORE, pages::order_page(&chrome, &page))
}

/// The order page's content. `token` is the order's token when the buyer presented it (the
/// sandbox's pay page needs it); `return_link_until` is set when shown through a return link.
fn order_page_of(
    api: &NodeApi,
    ctx: &Ctx,
    record: &OrderRecord,
    token: Option<&str>,
    return_link_until: Option<String>,
) -> OrderPage {
    let title =
        api.engine.catalog().get(&record.sku).map_or_else(|| record.sku.to_string(), |p| title_of(&p, ctx.lang));
    let state = match record.status {
        OrderStatus::Reserved => {
            // The channel of the latest attempt: where the buyer was sent to pay.
            let channel = record.channel.as_str();
            let pay_link = if channel == sandbox::NAME {
                token.filter(|_| api.sandbox.is_some()).map(|token| pay_path(&record.id, token))
            } else {
                record
                    .latest_attempt()
                    .and_then(|a| a.pay_url.clone())
                    .or_else(|| api.channels.get(channel).and_then(|c| c.local_pay_url(record, &api.public_url)))
            };
            OrderState::Reserved { expires: minutes(record.expires_at), pay_link }
        }
        OrderStatus::Delivered => OrderState::Delivered {
            keys: record.secrets.iter().map(|s| s.expose().to_string()).collect(),
            delivered_at: record.delivered_at.map(minutes),
        },
        OrderStatus::Expired => OrderState::Expired { product_link: format!("/p/{}", record.sku) },
        OrderStatus::PaidAwaitingStock => OrderState::PaidAwaitingStock,
        OrderStatus::Refunded => OrderState::Refunded,
    };
    OrderPage {
        order_id: record.id.to_string(),
        item: title,
        quantity: record.quantity,
        total: money::format_price(record.amount_minor, &record.currency, ctx.lang),
        state,
        return_link_until,
    }
}

/// The order named by `id`, if `token` is its token; otherwise the one "order not found" page
/// (an unknown order and a wrong token look the same).
async fn authorize(
    api: &NodeApi,
    ctx: &Ctx,
    id: &str,
    token: Option<&str>,
) -> Result<(OrderId, String, OrderRecord), Box<HttpResponse>> {
    let not_found =
        || Box::new(error(ctx, StatusCode::NOT_FOUND, Msg::ErrorUnknownOrderTitle, Msg::ErrorUnknownOrderBody));
    let id: OrderId = id.parse().map_err(|_| not_found())?;
    let token: OrderToken = token.unwrap_or("").trim().parse().map_err(|_| not_found())?;
    match api.engine.lookup(&id, &token).await {
        Ok(record) => Ok((id, token.to_string(), record)),
        Err(e) => Err(Box::new(engine_error(ctx, e, None))),
    }
}

fn static_asset(name: &str) -> HttpResponse {
    let Some(asset) = assets::find(name) else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_STORE));
        return response;
    };
    let mut response = Response::new(Full::new(Bytes::from_static(asset.body)));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(ASSET_CACHE));
    response
}

async fn read_form<B>(api: &NodeApi, ctx: &Ctx, body: B) -> Result<Vec<(String, String)>, Box<HttpResponse>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bad = |status| Box::new(error(ctx, status, Msg::ErrorBadRequestTitle, Msg::ErrorBadRequestBody));
    let limited = Limited::new(body, api.max_body_bytes);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(bad(StatusCode::REQUEST_TIMEOUT)),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(bad(StatusCode::PAYLOAD_TOO_LARGE))
        }
        Ok(Err(_)) => Err(bad(StatusCode::BAD_REQUEST)),
        Ok(Ok(collected)) => Ok(form::parse_urlencoded(&String::from_utf8_lossy(&collected.to_bytes()))),
    }
}

/// The "too many requests" page when the client is over its budget for `class`.
fn limit(api: &NodeApi, ctx: &Ctx, class: LimitClass) -> Option<HttpResponse> {
    api.limiters.check(class, ctx.client).err().map(|limited| {
        let secs = limited.retry_after_secs();
        let body = ctx.lang.f(Msg::ErrorRateLimitedBody, &[("secs", &secs.to_string())]);
        let page = error_page_for(Msg::ErrorRateLimitedTitle, body);
        html(ctx, StatusCode::TOO_MANY_REQUESTS, NO_STORE, pages::error_page(&ctx.chrome("/"), &page))
            .with_retry_after(secs)
    })
}

/// A friendly page for an engine refusal, with the API's status codes.
fn engine_error(ctx: &Ctx, e: OrderError, sku: Option<&Sku>) -> HttpResponse {
    let lang = ctx.lang;
    let back = |page: &mut ErrorPage| {
        if let Some(sku) = sku {
            page.links.push((format!("/p/{sku}"), lang.t(Msg::ErrorBackToProduct)));
        }
    };
    let (status, mut page, retry) = match e {
        OrderError::NotFound => (
            StatusCode::NOT_FOUND,
            error_page_for(Msg::ErrorUnknownOrderTitle, lang.t(Msg::ErrorUnknownOrderBody)),
            None,
        ),
        OrderError::UnknownSku(_) => (
            StatusCode::NOT_FOUND,
            error_page_for(Msg::ErrorUnknownProductTitle, lang.t(Msg::ErrorUnknownProductBody)),
            None,
        ),
        OrderError::SoldOut { .. } => {
            (StatusCode::CONFLICT, error_page_for(Msg::ErrorSoldOutTitle, lang.t(Msg::ErrorSoldOutBody)), None)
        }
        OrderError::TooManyOpen { .. } => {
            let secs = TOO_MANY_OPEN_RETRY_SECS;
            let body = lang.f(Msg::ErrorTooManyOpenBody, &[("secs", &secs.to_string())]);
            (StatusCode::TOO_MANY_REQUESTS, error_page_for(Msg::ErrorTooManyOpenTitle, body), Some(secs))
        }
        OrderError::StockSyncing { .. } | OrderError::AwaitingCoordinator => {
            let secs = 1;
            let body = lang.f(Msg::ErrorUnavailableBody, &[("secs", &secs.to_string())]);
            (StatusCode::SERVICE_UNAVAILABLE, error_page_for(Msg::ErrorUnavailableTitle, body), Some(secs))
        }
        OrderError::Store(e) => {
            tracing::error!(error = %e, "store failure while serving a storefront page");
            let secs = UNAVAILABLE_RETRY_SECS;
            let body = lang.f(Msg::ErrorUnavailableBody, &[("secs", &secs.to_string())]);
            (StatusCode::SERVICE_UNAVAILABLE, error_page_for(Msg::ErrorUnavailableTitle, body), Some(secs))
        }
        OrderError::BadQuantity { .. }
        | OrderError::UnsupportedCurrency { .. }
        | OrderError::UnknownChannel(_)
        | OrderError::BadEmail
        | OrderError::InvalidPayment(_)
        | OrderError::TooManyAttempts { .. }
        | OrderError::NotRefundable(_) => {
            (StatusCode::BAD_REQUEST, error_page_for(Msg::ErrorBadRequestTitle, lang.t(Msg::ErrorBadRequestBody)), None)
        }
    };
    back(&mut page);
    let response = html(ctx, status, NO_STORE, pages::error_page(&ctx.chrome("/"), &page));
    match retry {
        Some(secs) => response.with_retry_after(secs),
        None => response,
    }
}

fn error_page_for(title: Msg, body: impl Into<String>) -> ErrorPage {
    ErrorPage { title, body: body.into(), links: Vec::new() }
}

fn error(ctx: &Ctx, status: StatusCode, title: Msg, body: Msg) -> HttpResponse {
    let page = error_page_for(title, ctx.lang.t(body));
    html(ctx, status, NO_STORE, pages::error_page(&ctx.chrome("/"), &page))
}

/// An HTML page with the storefront's security headers.
fn html(ctx: &Ctx, status: StatusCode, cache_control: &'static str, markup: maud::Markup) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(markup.into_string())));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CONTENT_LANGUAGE, HeaderValue::from_static(ctx.lang.tag()));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache_control));
    if cache_control != NO_STORE {
        h.insert(header::VARY, HeaderValue::from_static("Accept-Language, Cookie"));
    }
    response
}

trait WithRetryAfter {
    fn with_retry_after(self, secs: u64) -> Self;
}

impl WithRetryAfter for HttpResponse {
    fn with_retry_after(mut self, secs: u64) -> Self {
        self.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        self
    }
}

/// A 303 to a same-origin path. Such locations carry tokens: never cached.
fn see_other(location: &str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_STORE));
    response.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn pay_path(id: &OrderId, token: &str) -> String {
    format!("/pay/sandbox/{id}?token={token}")
}

fn order_path(id: &OrderId, token: &str) -> String {
    format!("/order/{id}?token={token}")
}

/// `2026-05-01 12:34` (UTC).
fn minutes(at: edgecard_protocol::UnixMillis) -> String {
    let full = rfc3339(at);
    full.get(..16).map(|s| s.replace('T', " ")).unwrap_or(full)
}

/// A form POST that did not come from this shop's own pages: the browser says so
/// (`Sec-Fetch-Site` other than `same-origin` or `none`), or its `Origin` is a real origin that is
/// neither this node's public origin nor the one the request was sent to. `Origin: null` is what
/// browsers send for same-origin forms under `Referrer-Policy: no-referrer`, so it alone proves
/// nothing; `Sec-Fetch-Site` decides then.
fn is_cross_site(headers: &HeaderMap, uri: &http::Uri, public_url: &str) -> bool {
    let fetch_site = headers.get("sec-fetch-site").map(|v| v.to_str().unwrap_or("cross-site").trim());
    if fetch_site.is_some_and(|v| !v.eq_ignore_ascii_case("same-origin") && !v.eq_ignore_ascii_case("none")) {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return false };
    let Ok(origin) = origin.to_str() else { return true };
    let origin = origin.trim();
    if origin == "null" {
        return false;
    }
    if origin_of(public_url).is_some_and(|own| own.eq_ignore_ascii_case(origin)) {
        return false;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| uri.authority().map(|a| a.as_str()));
    match host {
        Some(host) => !origin.eq_ignore_ascii_case(&format!("https://{host}")),
        None => true,
    }
}

/// `scheme://authority` of a URL.
fn origin_of(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}
