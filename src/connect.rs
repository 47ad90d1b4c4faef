//! How natsched and its command-line tools connect to NATS: credentials given in the server
//! URL (`nats://user:password@host`, `nats://token@host`, as the `nats` CLI and the Go and
//! Python clients read them; async-nats 0.51 ignores them), or in `[nats]` (user and
//! password, token, credentials file, nkey seed file), and TLS (`[nats.tls]`).
//!
//! URLs are split before they are used: what goes to the client library, and what is ever
//! logged, has no credentials in it.

use std::path::PathBuf;

use async_nats::ConnectOptions;

use crate::config::{NatsConfig, Secret};

/// Why the connection could not be set up (before connecting).
#[derive(Debug, thiserror::Error)]
pub enum ConnectSetupError {
    #[error("the server URLs give different credentials; give them once")]
    MixedCredentials,
    #[error("credentials are given both in nats.url and in [nats] ({0}); give them in one place")]
    TwiceGiven(&'static str),
    #[error("credentials in a server URL are not valid UTF-8 once percent-decoded")]
    UrlEncoding,
    #[error("cannot read the credentials file {path}: {source}")]
    CredsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the nkey seed file {path}: {source}")]
    NkeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid server URL {url:?}: {source}")]
    Url { url: String, source: std::io::Error },
}

/// Credentials taken from a server URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlAuth {
    UserPassword { user: String, password: Secret },
    Token(Secret),
}

/// A comma-separated server URL list without its credentials, and the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrls {
    pub urls: String,
    pub auth: Option<UrlAuth>,
}

/// `url` split around its credentials: (scheme and `://`, the credentials, the rest after
/// `@`), or `None` if it has none.
fn userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let rest_at = url.find("://").map_or(0, |at| at + 3);
    let (scheme, rest) = url.split_at(rest_at);
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..host_end].rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// A server URL list with the credentials of each URL (`user:pass@`, `token@`) replaced by
/// `***@`: what logs and error messages show.
pub fn mask_credentials(urls: &str) -> String {
    urls.split(',')
        .map(|url| match userinfo(url) {
            Some((scheme, _, rest)) => format!("{scheme}***@{rest}"),
            None => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits the credentials off every URL of `urls`. Every URL that has credentials must have
/// the same ones.
pub fn split_credentials(urls: &str) -> Result<ServerUrls, ConnectSetupError> {
    let mut auth: Option<UrlAuth> = None;
    let mut bare = Vec::new();
    for url in urls.split(',') {
        let url = url.trim();
        let Some((scheme, userinfo, rest)) = userinfo(url) else {
            bare.push(url.to_owned());
            continue;
        };
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| ConnectSetupError::UrlEncoding)
        };
        let found = match userinfo.split_once(':') {
            Some((user, password)) => UrlAuth::UserPassword {
                user: decode(user)?,
                password: Secret::new(decode(password)?),
            },
            None => UrlAuth::Token(Secret::new(decode(userinfo)?)),
        };
        match &auth {
            Some(known) if *known != found => return Err(ConnectSetupError::MixedCredentials),
            _ => auth = Some(found),
        }
        bare.push(format!("{scheme}{rest}"));
    }
    Ok(ServerUrls {
        urls: bare.join(","),
        auth,
    })
}

/// Why a command-line tool could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ToolConnectError {
    #[error(transparent)]
    Setup(#[from] ConnectSetupError),
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
}

/// A command-line tool's connection to `urls` (credentials in them honoured, masked in
/// errors).
pub async fn for_tool(urls: &str) -> Result<async_nats::Client, ToolConnectError> {
    let (options, addresses) = for_urls(urls)?;
    options
        .connect(addresses)
        .await
        .map_err(|source| ToolConnectError::Connect {
            url: mask_credentials(urls),
            source,
        })
}

/// Options for a command-line tool given only a server URL list: its credentials, if any.
pub fn for_urls(
    urls: &str,
) -> Result<(ConnectOptions, Vec<async_nats::ServerAddr>), ConnectSetupError> {
    let ServerUrls { urls, auth } = split_credentials(urls)?;
    Ok((
        with_url_auth(ConnectOptions::new(), auth),
        addresses(&urls)?,
    ))
}

/// The servers of a comma-separated URL list (without credentials): async-nats reads one URL
/// from a string, so a list is given to it as addresses.
fn addresses(urls: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectSetupError> {
    urls.split(',')
        .map(|url| {
            url.trim().parse().map_err(|source| ConnectSetupError::Url {
                url: mask_credentials(url.trim()),
                source,
            })
        })
        .collect()
}

fn with_url_auth(options: ConnectOptions, auth: Option<UrlAuth>) -> ConnectOptions {
    match auth {
        Some(UrlAuth::UserPassword { user, password }) => {
            options.user_and_password(user, password.expose().to_owned())
        }
        Some(UrlAuth::Token(token)) => options.token(token.expose().to_owned()),
        None => options,
    }
}

/// Options for the daemon: credentials from `[nats]` or its URL (one place only), and TLS.
/// Returns the URLs to connect to, without credentials.
pub async fn for_daemon(
    nats: &NatsConfig,
    options: ConnectOptions,
) -> Result<(ConnectOptions, Vec<async_nats::ServerAddr>), ConnectSetupError> {
    let ServerUrls { urls, auth } = split_credentials(&nats.url)?;
    let addrs = addresses(&urls)?;
    let configured = nats.auth_kind();
    let mut options = match (auth, configured) {
        (Some(_), Some(kind)) => return Err(ConnectSetupError::TwiceGiven(kind)),
        (auth, _) => with_url_auth(options, auth),
    };
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &nats.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(path) = &nats.creds_file {
        options = options.credentials_file(path).await.map_err(|source| {
            ConnectSetupError::CredsFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    if let Some(path) = &nats.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| ConnectSetupError::NkeyFile {
            path: path.clone(),
            source,
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(tls) = &nats.tls {
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = options.require_tls(tls.required);
    }
    Ok((options, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_masked_when_shown() {
        for (url, shown) in [
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://u:p@h:4222", "nats://***@h:4222"),
            ("nats://tok@h", "nats://***@h"),
            ("u:p@h:4222", "***@h:4222"),
            (
                "tls://a:b@h1:4222,nats://h2:4222",
                "tls://***@h1:4222,nats://h2:4222",
            ),
            ("nats://h/x@y", "nats://h/x@y"),
            ("nats://a:p@ss@h", "nats://***@h"),
        ] {
            assert_eq!(mask_credentials(url), shown, "{url}");
        }
    }

    #[test]
    fn credentials_come_off_every_url() {
        let split = split_credentials("nats://u:p%40ss@h1:4222, nats://u:p%40ss@h2").unwrap();
        assert_eq!(split.urls, "nats://h1:4222,nats://h2");
        assert_eq!(
            split.auth,
            Some(UrlAuth::UserPassword {
                user: "u".into(),
                password: Secret::new("p@ss"),
            })
        );
        let split = split_credentials("tok@h:4222,nats://h2").unwrap();
        assert_eq!(split.urls, "h:4222,nats://h2");
        assert_eq!(split.auth, Some(UrlAuth::Token(Secret::new("tok"))));
        let plain = split_credentials("nats://h/x@y").unwrap();
        assert_eq!((plain.urls.as_str(), plain.auth), ("nats://h/x@y", None));
        assert!(matches!(
            split_credentials("nats://a:b@h1,nats://c:d@h2"),
            Err(ConnectSetupError::MixedCredentials)
        ));
        assert!(matches!(
            split_credentials("nats://a:%ff@h"),
            Err(ConnectSetupError::UrlEncoding)
        ));
    }
}
