//! The order mails, in English and Simplified Chinese (pure: values in, subject and text out).
//!
//! Plain text only: no markup to escape, nothing remote to load, and every client shows it.

use super::queue::MailKind;

/// What a mail says about its order.
#[derive(Debug, Clone)]
pub struct MailContent<'a> {
    pub kind: MailKind,
    /// `en` or `zh-CN`; anything else reads as `en`.
    pub lang: &'a str,
    pub shop: &'a str,
    pub order_id: &'a str,
    pub item: &'a str,
    pub quantity: u32,
    pub total: &'a str,
    /// Opens the order's page in a browser.
    pub link: &'a str,
    /// Until when the link works (`YYYY-MM-DD HH:MM UTC`).
    pub link_until: &'a str,
    /// The keys, for a [`MailKind::Keys`] mail only.
    pub keys: &'a [&'a str],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    pub subject: String,
    pub body: String,
}

pub fn render(mail: &MailContent<'_>) -> RenderedMail {
    if mail.lang == "zh-CN" {
        render_zh(mail)
    } else {
        render_en(mail)
    }
}

fn render_en(m: &MailContent<'_>) -> RenderedMail {
    let head = format!("Order {}\n{} × {}\nTotal: {}\n", m.order_id, m.item, m.quantity, m.total);
    match m.kind {
        MailKind::OrderLink => RenderedMail {
            subject: format!("{}: your order {}", m.shop, m.order_id),
            body: format!(
                "Thank you for your order at {shop}.\n\n{head}\nYour order page (payment status, and your keys once paid):\n{link}\n\n\
                 The link works until {until}. Anyone with it can see the order, so keep this mail to yourself.\n\
                 If you did not place this order, ignore this mail.\n",
                shop = m.shop,
                link = m.link,
                until = m.link_until,
            ),
        },
        MailKind::Found => RenderedMail {
            subject: format!("{}: a link to your order {}", m.shop, m.order_id),
            body: format!(
                "Someone, hopefully you, asked {shop} to send this address links to its orders.\n\n{head}\n\
                 Your order page (payment status, and your keys once paid):\n{link}\n\n\
                 The link works until {until}. Anyone with it can see the order, so keep this mail to yourself.\n\
                 If you did not ask, ignore this mail: nothing has changed.\n",
                shop = m.shop,
                link = m.link,
                until = m.link_until,
            ),
        },
        MailKind::Keys => RenderedMail {
            subject: format!("{}: your keys for order {}", m.shop, m.order_id),
            body: format!(
                "Your order at {shop} is delivered.\n\n{head}\nYour keys:\n{keys}\n\nOrder page:\n{link}\n(works until {until})\n\n\
                 Keep this mail to yourself: the keys are yours to redeem.\n",
                shop = m.shop,
                keys = key_lines(m.keys),
                link = m.link,
                until = m.link_until,
            ),
        },
    }
}

fn render_zh(m: &MailContent<'_>) -> RenderedMail {
    let head = format!("订单号：{}\n{} × {}\n合计：{}\n", m.order_id, m.item, m.quantity, m.total);
    match m.kind {
        MailKind::OrderLink => RenderedMail {
            subject: format!("{}：您的订单 {}", m.shop, m.order_id),
            body: format!(
                "感谢您在 {shop} 下单。\n\n{head}\n订单页面（支付状态，付款后可查看卡密）：\n{link}\n\n\
                 链接有效期至 {until}。持有此链接的人都能查看订单，请勿转发本邮件。\n\
                 如果这不是您下的订单，请忽略本邮件。\n",
                shop = m.shop,
                link = m.link,
                until = m.link_until,
            ),
        },
        MailKind::Found => RenderedMail {
            subject: format!("{}：您的订单 {} 的链接", m.shop, m.order_id),
            body: format!(
                "有人（希望是您本人）请求 {shop} 将此邮箱的订单链接发送到本邮箱。\n\n{head}\n\
                 订单页面（支付状态，付款后可查看卡密）：\n{link}\n\n\
                 链接有效期至 {until}。持有此链接的人都能查看订单，请勿转发本邮件。\n\
                 如果这不是您的请求，请忽略本邮件，订单不受影响。\n",
                shop = m.shop,
                link = m.link,
                until = m.link_until,
            ),
        },
        MailKind::Keys => RenderedMail {
            subject: format!("{}：订单 {} 的卡密", m.shop, m.order_id),
            body: format!(
                "您在 {shop} 的订单已发货。\n\n{head}\n您的卡密：\n{keys}\n\n订单页面：\n{link}\n（有效期至 {until}）\n\n\
                 请妥善保管本邮件，卡密仅供您本人兑换。\n",
                shop = m.shop,
                keys = key_lines(m.keys),
                link = m.link,
                until = m.link_until,
            ),
        },
    }
}

fn key_lines(keys: &[&str]) -> String {
    keys.iter().map(|k| format!("  {k}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(kind: MailKind, lang: &str) -> MailContent<'static> {
        MailContent {
            kind,
            lang: if lang == "zh-CN" { "zh-CN" } else { "en" },
            shop: "Shop",
            order_id: "ord-1",
            item: "Game card",
            quantity: 2,
            total: "$9.98",
            link: "https://shop.example/order/ord-1/return/1-ab",
            link_until: "2030-01-01 00:00 UTC",
            keys: &["KEY-ONE", "KEY-TWO"],
        }
    }

    #[test]
    fn the_link_mail_has_the_link_and_never_the_keys() {
        for lang in ["en", "zh-CN"] {
            let mail = render(&content(MailKind::OrderLink, lang));
            assert!(mail.body.contains("https://shop.example/order/ord-1/return/1-ab"), "{lang}");
            assert!(mail.subject.contains("ord-1"), "{lang}");
            assert!(!mail.body.contains("KEY-ONE"), "{lang}");
        }
    }

    #[test]
    fn the_find_order_mail_has_the_link_and_never_the_keys_in_both_languages() {
        let en = render(&content(MailKind::Found, "en"));
        let zh = render(&content(MailKind::Found, "zh-CN"));
        for mail in [&en, &zh] {
            assert!(mail.body.contains("https://shop.example/order/ord-1/return/1-ab"));
            assert!(!mail.body.contains("KEY-ONE"));
            assert!(mail.subject.contains("ord-1"));
        }
        assert!(en.body.contains("If you did not ask"));
        assert!(zh.body.contains("如果这不是您的请求"));
    }

    #[test]
    fn the_keys_mail_lists_every_key_in_the_buyers_language() {
        let en = render(&content(MailKind::Keys, "en"));
        let zh = render(&content(MailKind::Keys, "zh-CN"));
        for mail in [&en, &zh] {
            assert!(mail.body.contains("  KEY-ONE\n  KEY-TWO"));
        }
        assert!(en.body.contains("Your keys"));
        assert!(zh.body.contains("您的卡密"));
        assert_ne!(en.subject, zh.subject);
    }
}
