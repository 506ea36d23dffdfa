//! Binding a verified payment to its order (pure). A provider's signature says a payment
//! happened; it is the order's only if it was made through one of the order's payment attempts
//! (same channel, and the provider's reference when it gives one), its transaction id paid no other
//! order, and it paid the order's amount in the order's currency. Anything else is a
//! [`PaymentProblemKind`]: recorded and raised, never delivered and never dropped silently.

use edgecard_protocol::{OrderId, MAX_EVENT_TEXT};

use super::engine::PaymentConfirmation;
use super::record::{OrderRecord, PaymentProblemKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The order's payment: settle it.
    Pay,
    /// This (channel, transaction) already paid this order.
    AlreadyRecorded,
    /// It paid nothing.
    Problem(PaymentProblemKind),
}

/// How `payment` binds to `order`, given the order its transaction id already paid (`owner`).
pub fn bind(order: &OrderRecord, payment: &PaymentConfirmation, owner: Option<OrderId>) -> Binding {
    match owner {
        Some(owner) if owner == order.id => return Binding::AlreadyRecorded,
        Some(_) => return Binding::Problem(PaymentProblemKind::ProviderTxnReused),
        None => {}
    }
    if let Err(reason) = order.binds(&payment.channel, payment.provider_ref.as_deref()) {
        return Binding::Problem(reason.into());
    }
    if payment.amount_minor != order.amount_minor {
        return Binding::Problem(PaymentProblemKind::AmountMismatch);
    }
    if payment.currency != order.currency {
        return Binding::Problem(PaymentProblemKind::CurrencyMismatch);
    }
    Binding::Pay
}

/// The provider's strings are stored, keyed on, and sent to the ledger, which refuses events
/// whose texts are empty, longer than [`MAX_EVENT_TEXT`] or hold control characters, and
/// currencies that are not three upper-case letters: such a payment is refused before anything
/// is written (the provider retries, an operator sees the refusals).
pub fn check_fields(payment: &PaymentConfirmation) -> Result<(), &'static str> {
    let text = |s: &str| !s.is_empty() && s.len() <= MAX_EVENT_TEXT && !s.chars().any(char::is_control);
    if !text(&payment.provider_txn) {
        return Err("provider transaction id");
    }
    if payment.provider_payment.as_deref().is_some_and(|p| !text(p)) {
        return Err("provider payment id");
    }
    if payment.currency.len() != 3 || !payment.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("currency");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::orders::record::PaymentAttempt;
    use edgecard_protocol::UnixMillis;

    fn payment(order: &OrderRecord, channel: &str, reference: Option<&str>) -> PaymentConfirmation {
        PaymentConfirmation {
            order_id: order.id,
            channel: channel.into(),
            provider_txn: reference.unwrap_or("T-1").into(),
            amount_minor: order.amount_minor,
            currency: order.currency.clone(),
            provider_ref: reference.map(str::to_string),
            provider_payment: None,
        }
    }

    fn attempt(channel: &str, reference: Option<&str>) -> PaymentAttempt {
        PaymentAttempt {
            channel: channel.into(),
            provider_ref: reference.map(str::to_string),
            pay_url: None,
            created_at: UnixMillis(1),
            pays_until: None,
        }
    }

    #[test]
    fn a_payment_binds_to_any_of_the_orders_attempts() {
        let mut order = OrderRecord::for_tests("epay", 1, 1000, "CNY");
        assert_eq!(bind(&order, &payment(&order, "epay", None), None), Binding::Pay, "the implied attempt");
        order.attempts = vec![attempt("stripe", Some("cs_a")), attempt("epay", None), attempt("stripe", Some("cs_b"))];
        for (channel, reference) in [("stripe", Some("cs_a")), ("stripe", Some("cs_b")), ("epay", None)] {
            assert_eq!(bind(&order, &payment(&order, channel, reference), None), Binding::Pay, "{channel}");
        }
    }

    #[test]
    fn other_channels_references_and_owners_are_problems() {
        let mut order = OrderRecord::for_tests("epay", 1, 1000, "CNY");
        let problem = |o: &OrderRecord, p: &PaymentConfirmation, owner| bind(o, p, owner);
        assert_eq!(
            problem(&order, &payment(&order, "stripe", Some("cs_x")), None),
            Binding::Problem(PaymentProblemKind::WrongChannel),
            "a Stripe payment for an order opened on EPay"
        );
        order.attempts = vec![attempt("stripe", Some("cs_a"))];
        order.channel = "stripe".into();
        assert_eq!(
            problem(&order, &payment(&order, "stripe", Some("cs_other")), None),
            Binding::Problem(PaymentProblemKind::UnknownReference)
        );
        assert_eq!(
            problem(&order, &payment(&order, "epay", None), None),
            Binding::Problem(PaymentProblemKind::WrongChannel),
            "recorded attempts replace the implied one"
        );
        let paid = payment(&order, "stripe", Some("cs_a"));
        assert_eq!(problem(&order, &paid, Some(order.id)), Binding::AlreadyRecorded);
        assert_eq!(
            problem(&order, &paid, Some(OrderId::random())),
            Binding::Problem(PaymentProblemKind::ProviderTxnReused)
        );
        let cheap = PaymentConfirmation { amount_minor: 1, ..paid.clone() };
        assert_eq!(problem(&order, &cheap, None), Binding::Problem(PaymentProblemKind::AmountMismatch));
        let euros = PaymentConfirmation { currency: "EUR".into(), ..paid };
        assert_eq!(problem(&order, &euros, None), Binding::Problem(PaymentProblemKind::CurrencyMismatch));
    }

    #[test]
    fn an_order_restored_before_payment_binds_any_channel() {
        let order = OrderRecord::for_tests("", 1, 1000, "USD");
        assert_eq!(bind(&order, &payment(&order, "stripe", Some("cs_a")), None), Binding::Pay);
    }

    #[test]
    fn provider_strings_the_ledger_would_refuse_are_refused() {
        let order = OrderRecord::for_tests("stripe", 1, 1000, "USD");
        let good = payment(&order, "stripe", Some("cs_a"));
        assert_eq!(check_fields(&good), Ok(()));
        for bad in [
            PaymentConfirmation { provider_txn: String::new(), ..good.clone() },
            PaymentConfirmation { provider_txn: "x".repeat(MAX_EVENT_TEXT + 1), ..good.clone() },
            PaymentConfirmation { provider_txn: "cs\n1".into(), ..good.clone() },
            PaymentConfirmation { currency: "usd".into(), ..good.clone() },
            PaymentConfirmation { currency: "DOLLARS".into(), ..good.clone() },
            PaymentConfirmation { provider_payment: Some(String::new()), ..good.clone() },
        ] {
            assert!(check_fields(&bad).is_err(), "{bad:?}");
        }
    }
}
