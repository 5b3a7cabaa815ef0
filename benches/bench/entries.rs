//! The entry lists the bench loads: kinds of prefixes, none adjacent to another.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    V4Host,
    V4Net24,
    V6Net64,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::V4Host, Kind::V4Net24, Kind::V6Net64];

    pub fn label(self) -> &'static str {
        match self {
            Kind::V4Host => "IPv4 /32",
            Kind::V4Net24 => "IPv4 /24",
            Kind::V6Net64 => "IPv6 /64",
        }
    }

    pub fn v6(self) -> bool {
        self == Kind::V6Net64
    }

    /// Entry `i` of this kind; `base` separates lists. Every other block is skipped, so no two
    /// entries are adjacent and aggregation keeps each one.
    pub fn entry(self, base: u32, i: u32) -> IpNet {
        match self {
            Kind::V4Host => IpNet::V4(Ipv4Net::new(Ipv4Addr::from((base << 24) + 2 * i), 32).unwrap()),
            Kind::V4Net24 => {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from((base << 24).wrapping_add((2 * i) << 8)), 24).unwrap())
            }
            Kind::V6Net64 => {
                let a = (0x2001_0db8u128 << 96) | (u128::from(base) << 88) | (u128::from(2 * i) << 64);
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), 64).unwrap())
            }
        }
    }

    pub fn entries(self, base: u32, n: u32) -> Vec<IpNet> {
        (0..n).map(|i| self.entry(base, i)).collect()
    }
}
