//! Which channels serve which currency, by name, as the config decides: the one rule shared by
//! order creation (the router's [`super::router::Routes`] are built from it), `check-config` and
//! the node's start-up warnings.
//!
//! - A currency listed in `payments.routes` gets exactly that list.
//! - Otherwise, on a node with a real channel (stripe, epay), the real channels that take the
//!   currency: stripe for any currency, epay for its own. The sandbox is never in a default route
//!   beside a real channel, so it can never catch an order a real channel failed to open.
//! - On a node whose only channel is the sandbox (a lab), the sandbox serves every currency.

use std::collections::BTreeMap;

use crate::config::NodeConfig;

use super::{epay, sandbox};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Currencies with a route of their own (listed in the config, or EPay's currency).
    pub by_currency: BTreeMap<String, Vec<&'static str>>,
    /// The route of every other currency.
    pub default: Vec<&'static str>,
}

impl RouteTable {
    pub fn from_config(config: &NodeConfig) -> RouteTable {
        let enabled = config.enabled_channels();
        let real = config.real_channels();
        let p = &config.payments;
        let mut by_currency = BTreeMap::new();
        for (currency, names) in &p.routes {
            // Validation made sure every listed name is enabled; map them to the static names.
            let route = names.iter().filter_map(|n| enabled.iter().copied().find(|e| e == n)).collect();
            by_currency.insert(currency.clone(), route);
        }
        let default: Vec<&'static str> = if real.is_empty() {
            enabled.iter().copied().filter(|n| *n == sandbox::NAME).collect()
        } else {
            real.iter().copied().filter(|n| *n != epay::NAME).collect()
        };
        if p.epay.enabled {
            by_currency.entry(p.epay.currency.to_string()).or_insert_with(|| real.clone());
        }
        RouteTable { by_currency, default }
    }

    pub fn route(&self, currency: &str) -> &[&'static str] {
        self.by_currency.get(currency).map_or(&self.default[..], |r| &r[..])
    }

    /// The channels of `currency`'s route that can take an amount in it.
    pub fn serving(&self, config: &NodeConfig, currency: &str) -> Vec<&'static str> {
        self.route(currency).iter().copied().filter(|name| takes(config, name, currency)).collect()
    }
}

/// Whether channel `name` can take an amount in `currency` (EPay takes its own currency only).
pub fn takes(config: &NodeConfig, name: &str, currency: &str) -> bool {
    name != epay::NAME || config.payments.epay.currency.as_str() == currency
}

/// One line per product currency that no enabled channel serves: buyers cannot pay in it (the
/// storefront hides it, and hides Buy when no currency of a product is left).
pub fn unserved_currencies(config: &NodeConfig) -> Vec<String> {
    let table = RouteTable::from_config(config);
    let mut warnings = Vec::new();
    for product in &config.products {
        for price in &product.prices {
            let currency = price.currency.as_str();
            if table.serving(config, currency).is_empty() {
                let route = table.route(currency);
                let why = if route.is_empty() {
                    "its route is empty".to_string()
                } else {
                    format!("its route [{}] cannot take {currency}", route.join(", "))
                };
                warnings.push(format!(
                    "product {}: no enabled payment channel serves {currency} ({why}); buyers cannot pay in it",
                    product.sku
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn config(extra: &str) -> NodeConfig {
        let text = format!(
            "node_id = \"eu-1\"\ndata_dir = \"data\"\n[trust]\ncoordinator_key = \"{KEY}\"\n{extra}\n\
             [[products]]\nsku = \"card\"\ntitle = {{ en = \"Card\" }}\n\
             prices = [{{ amount_minor = 100, currency = \"USD\" }}, {{ amount_minor = 700, currency = \"CNY\" }}]\n"
        );
        let path = Path::new("node.toml");
        let config = NodeConfig::parse(&text, path).unwrap();
        config.validate(path).unwrap();
        config
    }

    const STRIPE: &str = "[payments.stripe]\nenabled = true\nsecret_key = \"sk\"\nwebhook_secret = \"whsec\"\n";
    const EPAY: &str =
        "[payments.epay]\nenabled = true\ngateway_url = \"https://pay.example\"\npid = \"1\"\nkey = \"12345678\"\n";
    const LAB_BESIDE: &str = "[payments.sandbox]\nenabled = true\nallow_beside_real_channels = true\n";

    #[test]
    fn a_lab_node_routes_everything_to_the_sandbox() {
        let c = config("[payments.sandbox]\nenabled = true\n");
        let table = RouteTable::from_config(&c);
        assert_eq!(table.route("USD"), &["sandbox"]);
        assert_eq!(table.serving(&c, "JPY"), vec!["sandbox"]);
        assert!(unserved_currencies(&c).is_empty());
    }

    #[test]
    fn beside_a_real_channel_the_sandbox_is_only_where_routes_list_it() {
        let c = config(&format!("{STRIPE}{LAB_BESIDE}"));
        let table = RouteTable::from_config(&c);
        assert_eq!(table.route("USD"), &["stripe"], "no fallthrough to the sandbox by default");
        assert_eq!(table.route("CNY"), &["stripe"]);

        let c = config(&format!("{STRIPE}{LAB_BESIDE}[payments.routes]\nEUR = [\"stripe\", \"sandbox\"]\n"));
        let table = RouteTable::from_config(&c);
        assert_eq!(table.route("EUR"), &["stripe", "sandbox"]);
        assert_eq!(table.route("USD"), &["stripe"]);
    }

    #[test]
    fn epay_serves_its_own_currency_only() {
        let c = config(&format!("{STRIPE}{EPAY}"));
        let table = RouteTable::from_config(&c);
        assert_eq!(table.route("CNY"), &["stripe", "epay"]);
        assert_eq!(table.route("USD"), &["stripe"]);

        let c = config(EPAY);
        let table = RouteTable::from_config(&c);
        assert_eq!(table.route("USD"), &[] as &[&str]);
        assert_eq!(table.serving(&c, "CNY"), vec!["epay"]);
        let warnings = unserved_currencies(&c);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("product card") && warnings[0].contains("USD"), "{warnings:?}");

        let c = config(&format!("{EPAY}[payments.routes]\nUSD = [\"epay\"]\n"));
        let warnings = unserved_currencies(&c);
        assert!(warnings[0].contains("cannot take USD"), "{warnings:?}");
    }

    #[test]
    fn no_channel_at_all_leaves_every_currency_unserved() {
        let c = config("");
        assert_eq!(unserved_currencies(&c).len(), 2);
    }
}
