//! Client IP resolution for nodes that sit behind a CDN or reverse proxy.
//!
//! The TCP peer address is the only value a client cannot forge. A forwarding header is
//! honoured only when that peer lies inside one of the configured trusted proxy CIDRs;
//! otherwise the peer itself is the client.
//!
//! Rules, with every address (peer, header values and configured CIDRs) normalised so that an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is handled as the IPv4 address `a.b.c.d`:
//!
//! * header [`ClientIpHeader::None`], or an untrusted peer: the peer.
//! * [`ClientIpHeader::CfConnectingIp`] / [`ClientIpHeader::TrueClientIp`]: exactly one header
//!   line holding a bare IP address gives that address; a missing, repeated or unparsable
//!   header gives the peer.
//! * [`ClientIpHeader::XForwardedFor`]: all `X-Forwarded-For` lines are read in order as one
//!   comma-separated list and walked from the right. Entries inside a trusted CIDR are skipped
//!   as proxy hops; the first untrusted entry is the client. An entry that does not parse stops
//!   the walk and the last trusted hop seen is returned (the peer if none was seen). If every
//!   entry is trusted, the left-most entry is returned.
//!
//! An `X-Forwarded-For` entry may be a bare address (`203.0.113.7`, `2001:db8::1`), a bracketed
//! IPv6 address (`[2001:db8::1]`), or either of those with a port (`203.0.113.7:4711`,
//! `[2001:db8::1]:4711`), because some proxies append the peer's socket address. The port is
//! discarded. Anything else (`unknown`, RFC 7239 obfuscated identifiers, an empty entry) does
//! not parse. `CF-Connecting-IP` and `True-Client-IP` accept a bare address only.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// `CF-Connecting-IP`, set by Cloudflare.
pub const CF_CONNECTING_IP: HeaderName = HeaderName::from_static("cf-connecting-ip");
/// `True-Client-IP`, set by Akamai and Cloudflare Enterprise.
pub const TRUE_CLIENT_IP: HeaderName = HeaderName::from_static("true-client-ip");
/// `X-Forwarded-For`, appended to by most proxies and CDNs.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Which request header carries the client address when the TCP peer is a trusted proxy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIpHeader {
    /// Ignore forwarding headers; the TCP peer is the client (`"none"`, the default).
    #[default]
    None,
    /// `CF-Connecting-IP` (`"cf-connecting-ip"`).
    CfConnectingIp,
    /// `True-Client-IP` (`"true-client-ip"`).
    TrueClientIp,
    /// The right-most untrusted `X-Forwarded-For` entry (`"x-forwarded-for"`).
    XForwardedFor,
}

impl ClientIpHeader {
    /// The header this setting reads, or `None` for [`ClientIpHeader::None`].
    pub fn header_name(self) -> Option<HeaderName> {
        match self {
            ClientIpHeader::None => None,
            ClientIpHeader::CfConnectingIp => Some(CF_CONNECTING_IP),
            ClientIpHeader::TrueClientIp => Some(TRUE_CLIENT_IP),
            ClientIpHeader::XForwardedFor => Some(X_FORWARDED_FOR),
        }
    }

    /// The configuration spelling of this setting.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientIpHeader::None => "none",
            ClientIpHeader::CfConnectingIp => "cf-connecting-ip",
            ClientIpHeader::TrueClientIp => "true-client-ip",
            ClientIpHeader::XForwardedFor => "x-forwarded-for",
        }
    }
}

impl std::fmt::Display for ClientIpHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Works out the client address of a request from its TCP peer and headers.
#[derive(Clone, Debug)]
pub struct ClientIpResolver {
    trusted: Vec<IpNet>,
    header: ClientIpHeader,
}

impl ClientIpResolver {
    /// Builds a resolver. CIDRs written as IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`) are
    /// converted to their IPv4 form (`10.0.0.0/8`) so they match normalised addresses.
    pub fn new(trusted_proxies: Vec<IpNet>, header: ClientIpHeader) -> Self {
        let trusted = trusted_proxies.into_iter().map(|net| normalize_net(net).trunc()).collect();
        Self { trusted, header }
    }

    /// The trusted proxy CIDRs, after normalisation.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted
    }

    /// The configured header.
    pub fn header(&self) -> ClientIpHeader {
        self.header
    }

    /// Whether `ip` lies inside a trusted proxy CIDR.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address for a request that arrived from `peer` with `headers`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.header == ClientIpHeader::None || !self.is_trusted(peer) {
            return peer;
        }
        match self.header {
            ClientIpHeader::None => peer,
            ClientIpHeader::CfConnectingIp => single_ip(headers, &CF_CONNECTING_IP).unwrap_or(peer),
            ClientIpHeader::TrueClientIp => single_ip(headers, &TRUE_CLIENT_IP).unwrap_or(peer),
            ClientIpHeader::XForwardedFor => self.resolve_forwarded_for(peer, headers),
        }
    }

    fn resolve_forwarded_for(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut last_trusted = None;
        for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(line) = line.to_str() else {
                return last_trusted.unwrap_or(peer);
            };
            for entry in line.rsplit(',') {
                match parse_forwarded_entry(entry) {
                    None => return last_trusted.unwrap_or(peer),
                    Some(ip) if self.is_trusted(ip) => last_trusted = Some(ip),
                    Some(ip) => return ip,
                }
            }
        }
        last_trusted.unwrap_or(peer)
    }
}

/// The value of `name` when it appears exactly once and holds a bare IP address.
fn single_ip(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => parse_bare(value),
        _ => None,
    }
}

fn parse_bare(value: &HeaderValue) -> Option<IpAddr> {
    let text = value.to_str().ok()?.trim();
    text.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Parses one `X-Forwarded-For` entry: `ip`, `[v6]`, `v4:port` or `[v6]:port`.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(inner) = entry.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(|ip| IpAddr::V6(ip).to_canonical());
    }
    entry.parse::<SocketAddr>().ok().map(|sa| sa.ip().to_canonical())
}

/// Rewrites an IPv4-mapped IPv6 network (`::ffff:0:0/96` and narrower) as IPv4.
fn normalize_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.network().to_ipv4_mapped() {
                if let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(v4net);
                }
            }
        }
    }
    net
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append((*name).clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn cdn(header: ClientIpHeader) -> ClientIpResolver {
        ClientIpResolver::new(nets(&["10.0.0.0/8", "173.245.48.0/20", "2400:cb00::/32"]), header)
    }

    const PROXY: &str = "10.1.2.3";
    const PROXY6: &str = "2400:cb00:1::5";

    #[test]
    fn header_names_round_trip_through_serde() {
        for (variant, text) in [
            (ClientIpHeader::None, "none"),
            (ClientIpHeader::CfConnectingIp, "cf-connecting-ip"),
            (ClientIpHeader::TrueClientIp, "true-client-ip"),
            (ClientIpHeader::XForwardedFor, "x-forwarded-for"),
        ] {
            let json = format!("\"{text}\"");
            assert_eq!(serde_json::to_string(&variant).unwrap(), json);
            assert_eq!(serde_json::from_str::<ClientIpHeader>(&json).unwrap(), variant);
            assert_eq!(variant.as_str(), text);
            assert_eq!(variant.to_string(), text);
        }
        assert_eq!(ClientIpHeader::default(), ClientIpHeader::None);
        assert!(serde_json::from_str::<ClientIpHeader>("\"X-Forwarded-For\"").is_err());
        assert_eq!(ClientIpHeader::None.header_name(), None);
        assert_eq!(ClientIpHeader::XForwardedFor.header_name(), Some(X_FORWARDED_FOR));
    }

    #[test]
    fn header_none_ignores_headers_even_from_trusted_peer() {
        let r = cdn(ClientIpHeader::None);
        let h = headers(&[(&CF_CONNECTING_IP, "198.51.100.1"), (&X_FORWARDED_FOR, "198.51.100.2")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        for header in [ClientIpHeader::CfConnectingIp, ClientIpHeader::TrueClientIp, ClientIpHeader::XForwardedFor] {
            let r = cdn(header);
            let h = headers(&[
                (&CF_CONNECTING_IP, "198.51.100.1"),
                (&TRUE_CLIENT_IP, "198.51.100.1"),
                (&X_FORWARDED_FOR, "198.51.100.1"),
            ]);
            assert_eq!(r.resolve(ip("203.0.113.9"), &h), ip("203.0.113.9"));
            assert_eq!(r.resolve(ip("2001:db8::9"), &h), ip("2001:db8::9"));
        }
    }

    #[test]
    fn no_trusted_proxies_means_peer() {
        let r = ClientIpResolver::new(Vec::new(), ClientIpHeader::XForwardedFor);
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1")]);
        assert_eq!(r.resolve(ip("127.0.0.1"), &h), ip("127.0.0.1"));
    }

    #[test]
    fn cf_connecting_ip_from_trusted_peer() {
        let r = cdn(ClientIpHeader::CfConnectingIp);
        let h = headers(&[(&CF_CONNECTING_IP, " 198.51.100.7 ")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("198.51.100.7"));
        let h = headers(&[(&CF_CONNECTING_IP, "2001:db8:1::7")]);
        assert_eq!(r.resolve(ip(PROXY6), &h), ip("2001:db8:1::7"));
        // The configured header only: True-Client-IP is not consulted.
        let h = headers(&[(&TRUE_CLIENT_IP, "198.51.100.7")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
    }

    #[test]
    fn true_client_ip_from_trusted_peer() {
        let r = cdn(ClientIpHeader::TrueClientIp);
        let h = headers(&[(&TRUE_CLIENT_IP, "198.51.100.8")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("198.51.100.8"));
        let h = headers(&[(&CF_CONNECTING_IP, "198.51.100.8")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
    }

    #[test]
    fn single_value_header_missing_repeated_or_bad_gives_peer() {
        let r = cdn(ClientIpHeader::CfConnectingIp);
        assert_eq!(r.resolve(ip(PROXY), &HeaderMap::new()), ip(PROXY));
        let repeated = headers(&[(&CF_CONNECTING_IP, "198.51.100.1"), (&CF_CONNECTING_IP, "198.51.100.2")]);
        assert_eq!(r.resolve(ip(PROXY), &repeated), ip(PROXY));
        for bad in ["", "unknown", "198.51.100.1, 198.51.100.2", "198.51.100.1:443", "[2001:db8::1]", "999.1.1.1"] {
            let h = headers(&[(&CF_CONNECTING_IP, bad)]);
            assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY), "value {bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(CF_CONNECTING_IP, HeaderValue::from_bytes(b"198.51.100.1\xff").unwrap());
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
    }

    #[test]
    fn xff_takes_right_most_untrusted_entry() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1, 173.245.48.10, 10.9.9.9")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("198.51.100.1"));
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("198.51.100.1"));
    }

    #[test]
    fn xff_spoofed_left_most_entry_is_ignored() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        // The client sent "X-Forwarded-For: 1.1.1.1, 10.0.0.1"; the CDN appended the real
        // address it saw. Neither forged entry may win.
        let h = headers(&[(&X_FORWARDED_FOR, "1.1.1.1, 10.0.0.1, 203.0.113.50, 173.245.48.1")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("203.0.113.50"));
    }

    #[test]
    fn xff_lines_are_joined_in_order() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        let h = headers(&[
            (&X_FORWARDED_FOR, "1.1.1.1, 203.0.113.50"),
            (&X_FORWARDED_FOR, "173.245.48.1"),
            (&X_FORWARDED_FOR, "10.2.2.2"),
        ]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("203.0.113.50"));
        let h = headers(&[(&X_FORWARDED_FOR, "203.0.113.50"), (&X_FORWARDED_FOR, "198.51.100.9")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("198.51.100.9"));
    }

    #[test]
    fn xff_unparsable_entry_stops_at_last_trusted_hop() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1, unknown, 10.7.7.7")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("10.7.7.7"));
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1, garbage")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1,,10.7.7.7")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("10.7.7.7"));
        let h = headers(&[(&X_FORWARDED_FOR, "")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
        let h = headers(&[(&X_FORWARDED_FOR, "_hidden, 10.7.7.7, 10.8.8.8")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("10.7.7.7"));
        let h = headers(&[(&X_FORWARDED_FOR, "1.2.3.4:80:90")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip(PROXY));
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_bytes(b"198.51.100.2\xff").unwrap());
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.3.3.3"));
        assert_eq!(r.resolve(ip(PROXY), &h), ip("10.3.3.3"));
    }

    #[test]
    fn xff_all_trusted_gives_left_most_entry() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        let h = headers(&[(&X_FORWARDED_FOR, "10.5.5.5, 173.245.48.2, 10.6.6.6")]);
        assert_eq!(r.resolve(ip(PROXY), &h), ip("10.5.5.5"));
    }

    #[test]
    fn xff_missing_gives_peer() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        assert_eq!(r.resolve(ip(PROXY), &HeaderMap::new()), ip(PROXY));
    }

    #[test]
    fn xff_accepts_ports_and_brackets() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        for (value, want) in [
            ("198.51.100.1:4711", "198.51.100.1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("198.51.100.1, 10.0.0.9:443", "198.51.100.1"),
            ("198.51.100.1, [::ffff:10.0.0.9]:443", "198.51.100.1"),
        ] {
            let h = headers(&[(&X_FORWARDED_FOR, value)]);
            assert_eq!(r.resolve(ip(PROXY), &h), ip(want), "value {value:?}");
        }
    }

    #[test]
    fn ipv6_peers_and_entries() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        let h = headers(&[(&X_FORWARDED_FOR, "2001:db8:aa::1, 2400:cb00:2::1")]);
        assert_eq!(r.resolve(ip(PROXY6), &h), ip("2001:db8:aa::1"));
        // An untrusted IPv6 peer is the client regardless of headers.
        assert_eq!(r.resolve(ip("2001:db8:bb::1"), &h), ip("2001:db8:bb::1"));
        // Mixed families along the chain.
        let h = headers(&[(&X_FORWARDED_FOR, "198.51.100.1, 2400:cb00:2::1")]);
        assert_eq!(r.resolve(ip(PROXY6), &h), ip("198.51.100.1"));
    }

    #[test]
    fn mapped_addresses_are_normalised() {
        let r = cdn(ClientIpHeader::XForwardedFor);
        // A mapped peer is matched against the IPv4 CIDRs and returned as IPv4.
        assert_eq!(r.resolve(ip("::ffff:203.0.113.4"), &HeaderMap::new()), ip("203.0.113.4"));
        let h = headers(&[(&X_FORWARDED_FOR, "::ffff:198.51.100.1, ::ffff:10.4.4.4")]);
        assert_eq!(r.resolve(ip("::ffff:10.1.1.1"), &h), ip("198.51.100.1"));
        assert!(r.is_trusted(ip("::ffff:10.1.1.1")));

        let r = cdn(ClientIpHeader::CfConnectingIp);
        let h = headers(&[(&CF_CONNECTING_IP, "::ffff:198.51.100.2")]);
        assert_eq!(r.resolve(ip("::ffff:10.1.1.1"), &h), ip("198.51.100.2"));
    }

    #[test]
    fn mapped_cidrs_are_normalised() {
        let r = ClientIpResolver::new(nets(&["::ffff:10.0.0.0/104", "192.0.2.77/24"]), ClientIpHeader::CfConnectingIp);
        assert_eq!(r.trusted_proxies(), nets(&["10.0.0.0/8", "192.0.2.0/24"]).as_slice());
        let h = headers(&[(&CF_CONNECTING_IP, "198.51.100.3")]);
        assert_eq!(r.resolve(ip("10.2.3.4"), &h), ip("198.51.100.3"));
        assert_eq!(r.resolve(ip("192.0.2.1"), &h), ip("198.51.100.3"));
        assert_eq!(r.header(), ClientIpHeader::CfConnectingIp);
    }
}
