//! Where an agent listens: an address and, when one process serves several hosts (the
//! simulated agent), the path its routes sit under.

use std::fmt;
use std::net::SocketAddr;

/// An agent's address: `IP:PORT` and an optional path prefix (`/h/7`). Written `IP:PORT` or
/// `IP:PORT/h/7`; read from those, from `http://IP:PORT[/PATH]`, or from a bare `IP` (port
/// [`crate::AGENT_PORT`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentAddress {
    pub addr: SocketAddr,
    /// Empty, or `/` followed by the path without a trailing `/`.
    pub prefix: String,
}

/// Why a string is not an [`AgentAddress`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent address {0:?} is not IP, IP:PORT or http://IP:PORT[/PATH]")]
pub struct BadAgentAddress(pub String);

impl AgentAddress {
    pub fn parse(s: &str) -> Result<AgentAddress, BadAgentAddress> {
        let bad = || BadAgentAddress(s.to_string());
        let t = s.trim();
        let rest = t.strip_prefix("http://").unwrap_or(t);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let addr = match authority.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => authority
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, crate::AGENT_PORT))
                .map_err(|_| bad())?,
        };
        let prefix = path.trim_end_matches('/');
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.');
        let segment_ok = |g: &str| !g.is_empty() && g != "." && g != "..";
        if !prefix.chars().all(allowed) || !prefix.split('/').skip(1).all(segment_ok) {
            return Err(bad());
        }
        Ok(AgentAddress {
            addr,
            prefix: prefix.to_string(),
        })
    }

    /// The path of `command_path` (`/vm/start`) at this agent.
    pub fn path(&self, command_path: &str) -> String {
        format!("{}{command_path}", self.prefix)
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for AgentAddress {
    type Err = BadAgentAddress;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentAddress::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_written_form_reads_back_to_one_canonical_form() {
        for (input, canonical) in [
            ("10.0.0.1", "10.0.0.1:7070"),
            ("10.0.0.1:7071", "10.0.0.1:7071"),
            (" http://127.0.0.1:7070/h/3/ ", "127.0.0.1:7070/h/3"),
            ("127.0.0.1:7070/h/3", "127.0.0.1:7070/h/3"),
            ("http://[::1]:80", "[::1]:80"),
        ] {
            let a = AgentAddress::parse(input).unwrap();
            assert_eq!(a.to_string(), canonical, "{input}");
            assert_eq!(AgentAddress::parse(canonical), Ok(a));
        }
        let a = AgentAddress::parse("127.0.0.1:7070/h/3").unwrap();
        assert_eq!(a.path("/vm/start"), "/h/3/vm/start");
    }

    #[test]
    fn what_is_not_an_address_is_refused() {
        for s in [
            "",
            "host.example:7070",
            "https://10.0.0.1",
            "10.0.0.1:99999",
            "10.0.0.1:7070/h?x=1",
            "10.0.0.1:7070/h/../x/",
            "10.0.0.1:7070//h",
            "10.0.0.1:7070/h/..",
        ] {
            assert!(AgentAddress::parse(s).is_err(), "{s}");
        }
    }
}
