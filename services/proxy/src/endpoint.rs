//! Upstream addresses: "host:port" or "http://host:port" (h2c only).

use std::fmt;

use http::uri::Authority;

use crate::ProxyError;

/// A validated upstream address, reached over plaintext HTTP/2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(Authority);

impl Endpoint {
    /// Parses "host:port" or "http://host:port"; `Err` says why not.
    pub fn parse(value: &str) -> Result<Self, String> {
        let trimmed = value.trim();
        let rest = match trimmed.split_once("://") {
            None => trimmed,
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "scheme {scheme:?} is not supported (plain host:port or http://host:port)"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err("empty address".into());
        }
        if rest.contains(['/', '?', '#', '@']) {
            return Err("expected host:port without path, query or user".into());
        }
        let authority: Authority = rest.parse().map_err(|e| format!("{e}"))?;
        if authority.host().is_empty() {
            return Err("missing host".into());
        }
        match authority.port_u16() {
            Some(0) | None => Err("missing or zero port".into()),
            Some(_) => Ok(Self(authority)),
        }
    }

    /// Like [`Endpoint::parse`], with the error naming the option.
    pub fn parse_field(field: &'static str, value: &str) -> Result<Self, ProxyError> {
        Self::parse(value).map_err(|reason| ProxyError::Endpoint {
            field,
            value: value.to_string(),
            reason,
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_port_and_http_urls() {
        for ok in [
            "127.0.0.1:7000",
            "http://svc.ns:80",
            "http://[::1]:9/",
            " a:1 ",
        ] {
            assert!(Endpoint::parse(ok).is_ok(), "{ok}");
        }
        let ep = Endpoint::parse("http://localhost:50051/").unwrap();
        assert_eq!(ep.to_string(), "localhost:50051");
    }

    #[test]
    fn rejects_what_is_not_host_port() {
        for bad in [
            "",
            "localhost",
            "localhost:0",
            "https://a:1",
            "a:1/path",
            "u@a:1",
            ":80",
            "a:notaport",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
        let err = Endpoint::parse_field("--model-manager", "nope").unwrap_err();
        assert!(err.to_string().contains("--model-manager"), "{err}");
    }
}
