//! Client address keys: what counts as "one client" for the per-address limits.
//!
//! An IPv4 client has one address. An IPv6 client usually has a whole prefix (a home or
//! a server gets at least a /64, RFC 6177), and picking a new address in it costs
//! nothing, so counting IPv6 clients by their full address caps nobody. Every
//! per-address limit therefore counts by [`client_key`]: the IPv4 address, or the IPv6
//! address cut to its first `[limits] ipv6_prefix` bits (default [`DEFAULT_IPV6_PREFIX`]).
//! Leaf module: depends on nothing in the crate.

use std::net::{IpAddr, Ipv6Addr};

/// IPv6 prefix length that counts as one client: a /64 is what one subscriber line or
/// one server is given (RFC 6177), and the smallest prefix SLAAC works in.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The key `ip` is counted under: an IPv4 address as it is (an IPv4-mapped IPv6 address
/// such as `::ffff:192.0.2.1`, the way a `[::]` listener sees IPv4 clients, becomes
/// `192.0.2.1`), an IPv6 address with every bit past the first `v6_prefix` cleared
/// (`2001:db8:1:2:3:4:5:6` at 64 is `2001:db8:1:2::`). A `v6_prefix` of 128 or more keeps
/// the whole address; 0 puts every IPv6 client under `::`.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let cleared = 128u32.saturating_sub(u32::from(v6_prefix));
            // A shift by 128 (prefix 0) would overflow: no bit is kept then.
            let mask = u128::MAX.checked_shl(cleared).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, prefix: u8) -> String {
        client_key(ip.parse().unwrap(), prefix).to_string()
    }

    #[test]
    fn ipv4_is_kept_and_mapped_ipv4_is_canonicalised() {
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7", 128), "192.0.2.7");
        // Only IPv4-mapped addresses are IPv4; the deprecated IPv4-compatible form is not.
        assert_eq!(key("::192.0.2.7", 64), "::");
    }

    #[test]
    fn ipv6_is_cut_to_the_prefix() {
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1", 64), "2001:db8:1:3::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 48), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 56), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:ff:3:4:5:6", 56), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:1ff:3:4:5:6", 56), "2001:db8:1:100::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 128), "2001:db8:1:2:3:4:5:6");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 200), "2001:db8:1:2:3:4:5:6");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 1), "::");
        assert_eq!(key("ffff::1", 1), "8000::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 0), "::");
        assert_eq!(key("::1", 64), "::");
    }
}
