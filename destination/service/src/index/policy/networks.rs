//! CIDRs as operators write them (`10.0.0.0/8`, `fd00::/8`, a bare address)
//! and as the API carries them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use weft_destination_api::Network;
use weft_destination_api::policy::network;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CIDR: write an address and a prefix length, like 10.0.0.0/8 or fd00::/8")]
pub struct BadCidr(pub String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(s.to_string());
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { ip, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix_len)
    }
}

impl Cidr {
    /// Whether `other` lies entirely inside this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix_len >= self.prefix_len
            && weft_destination_api::policy::network_contains(&self.to_network(vec![]), other.ip)
            && self.ip.is_ipv4() == other.ip.is_ipv4()
    }

    pub fn to_network(self, except: Vec<Network>) -> Network {
        network(self.ip, self.prefix_len, except)
    }
}

/// Linkerd's default cluster networks: the private ranges and CGNAT.
pub const DEFAULT_CLUSTER_NETWORKS: &str =
    "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8";

/// A comma-separated list of CIDRs (the `--cluster-networks` flag).
pub fn parse_list(s: &str) -> Result<Vec<Cidr>, BadCidr> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(c.prefix_len, 16);
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().prefix_len, 32);
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().prefix_len, 8);
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/129",
            "",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(parse_list(DEFAULT_CLUSTER_NETWORKS).unwrap().len(), 5);
    }

    #[test]
    fn covers() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(c.covers(&"10.244.1.0/24".parse().unwrap()));
        assert!(!c.covers(&"10.245.1.0/24".parse().unwrap()));
        assert!(!c.covers(&"10.0.0.0/8".parse().unwrap()));
        assert!(!c.covers(&"fd00::/64".parse().unwrap()));
    }
}
