//! The checkout's challenge page (docs/abuse.md): when the node asks for a proof of work, the
//! buyer sees one page that both solves it in a Web Worker and resubmits the order (with
//! JavaScript), and offers a wait ticket with a Continue button usable after a delay (without).
//! Both forms carry the checkout's fields again, so the order is the one the buyer asked for.

use edgecard_protocol::Sku;
use maud::{html, Markup};

use super::i18n::Msg;
use super::pages::{layout, Chrome, FormValues};
use super::{assets, form, html as page_response, Ctx, NO_STORE};
use crate::abuse::challenge::{Refusal, Token};
use crate::abuse::{Gate, Presented};
use crate::api::{HttpResponse, NodeApi};
use crate::orders::engine::now_millis;

/// Asks the abuse gate about a checkout; `None` lets it through, `Some` is the challenge page.
pub(super) fn gate(
    api: &NodeApi,
    ctx: &Ctx,
    sku: &Sku,
    fields: &[(String, String)],
    values: &FormValues,
) -> Option<HttpResponse> {
    let presented = match (form::first(fields, "challenge"), form::first(fields, "ticket")) {
        (Some(token), _) => Presented::Solution { token, solution: form::first(fields, "solution").unwrap_or("") },
        (None, Some(token)) => Presented::Ticket { token },
        (None, None) => Presented::Nothing,
    };
    let now = now_millis().0;
    let Gate::Challenge { challenge, refused } = api.abuse.gate(ctx.client, sku, presented, now) else {
        return None;
    };
    // A ticket pressed too early is shown again with the time left; any other page gets a new one.
    let (ticket, wait_secs) = match (presented, refused) {
        (Presented::Ticket { token }, Some(Refusal::TooEarly)) => {
            match api.abuse.pending_ticket(ctx.client, sku, token, now) {
                Some(pending) => pending,
                None => fresh_ticket(api, ctx, sku, challenge.difficulty, now),
            }
        }
        _ => fresh_ticket(api, ctx, sku, challenge.difficulty, now),
    };
    let page = ChallengePage {
        sku: sku.to_string(),
        values: values.clone(),
        challenge,
        ticket,
        wait_secs,
        too_early: refused == Some(Refusal::TooEarly),
        refused: refused.is_some_and(|r| r != Refusal::TooEarly),
    };
    let chrome = ctx.chrome(format!("/p/{sku}"));
    Some(page_response(ctx, crate::abuse::http::STATUS, NO_STORE, challenge_page(&chrome, &page)))
}

fn fresh_ticket(api: &NodeApi, ctx: &Ctx, sku: &Sku, difficulty: u8, now: u64) -> (Token, u64) {
    let ticket = api.abuse.wait_ticket(ctx.client, sku, difficulty, now);
    let left = ticket.not_before.saturating_sub(now / 1000);
    (ticket, left)
}

struct ChallengePage {
    sku: String,
    values: FormValues,
    challenge: Token,
    ticket: Token,
    wait_secs: u64,
    too_early: bool,
    refused: bool,
}

/// `HH:MM:SS` (UTC) of unix seconds.
fn clock(secs: u64) -> String {
    let full = crate::time_fmt::rfc3339(edgecard_protocol::UnixMillis(secs.saturating_mul(1000)));
    full.get(11..19).map(str::to_string).unwrap_or(full)
}

fn order_fields(page: &ChallengePage) -> Markup {
    html! {
        input type="hidden" name="sku" value=(page.sku);
        input type="hidden" name="quantity" value=(page.values.quantity);
        input type="hidden" name="email" value=(page.values.email);
        @if let Some(currency) = &page.values.currency {
            input type="hidden" name="currency" value=(currency);
        }
        @if let Some(channel) = &page.values.channel {
            input type="hidden" name="channel" value=(channel);
        }
    }
}

fn challenge_page(c: &Chrome, page: &ChallengePage) -> Markup {
    let lang = c.lang;
    let body = html! {
        h1 #challenge-title { (c.t(Msg::ChallengeTitle)) }
        @if page.refused {
            p.notice.bad #challenge-refused role="alert" { (c.t(Msg::ChallengeRefused)) }
        }
        p { (c.t(Msg::ChallengeBody)) }
        p.notice #pow-progress role="status" hidden
            data-working=(c.t(Msg::ChallengeWorking))
            data-progress=(c.t(Msg::ChallengeProgress))
            data-done=(c.t(Msg::ChallengeDone))
            data-failed=(c.t(Msg::ChallengeFailed)) {}
        form #pow-form method="post" action="/checkout" hidden
            data-worker=(assets::url(&assets::POW_WORKER))
            data-difficulty=(page.challenge.difficulty) {
            (order_fields(page))
            input type="hidden" name="challenge" value=(page.challenge.text);
            input type="hidden" name="solution" value="";
        }
        form.card #wait-form method="post" action="/checkout" {
            h2 { (c.t(Msg::ChallengeNoJsHeading)) }
            @if page.too_early {
                p.notice.warn #too-early role="alert" {
                    (lang.f(Msg::ChallengeTooEarly, &[("secs", &page.wait_secs.to_string())]))
                }
            }
            p #wait-note {
                (lang.f(Msg::ChallengeNoJsBody, &[
                    ("secs", &page.wait_secs.to_string()),
                    ("time", &clock(page.ticket.not_before)),
                ]))
            }
            (order_fields(page))
            input type="hidden" name="ticket" value=(page.ticket.text);
            button.wide #continue type="submit" { (c.t(Msg::ChallengeContinue)) }
        }
    };
    layout(c, c.t(Msg::ChallengeTitle), None, body)
}
