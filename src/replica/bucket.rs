//! `s3://BUCKET/PREFIX`: a replica's objects (`objects.rs`) in any S3-compatible bucket.
//!
//! Requests are signed by rusty-s3 (SigV4 presigned URLs, no I/O of its own) and sent by the
//! same blocking HTTP client as `capsulefs serve` replicas, so the core stays synchronous and
//! no second TLS stack is linked. Settings come from the standard AWS environment:
//! `AWS_ENDPOINT_URL` (then path-style addressing), `AWS_REGION` or `AWS_DEFAULT_REGION`
//! (default us-east-1), `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, or
//! the `AWS_PROFILE` (default "default") section of `~/.aws/credentials`.
//! Correctness never rests on conditional writes (Garage ignores them): the layout gives
//! every mutable object one writer.

use std::time::Duration;

use rusty_s3::actions::{GetObject, ListObjectsV2, PutObject, S3Action};
use rusty_s3::{Credentials, UrlStyle};

use super::objects::Objects;
use super::remote::{MAX_ANSWER, agent};
use crate::{Error, Result};

/// How long a signed request stays valid: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(300);

pub struct Bucket {
    bucket: rusty_s3::Bucket,
    credentials: Option<Credentials>,
    /// Keys are `<prefix>/<key>`, or `<key>` with no prefix.
    prefix: String,
    url: String,
    agent: ureq::Agent,
}

/// The `section` of an AWS-style ini file (`~/.aws/credentials`), as (key, value) pairs.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut pairs = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    pairs
}

fn credentials() -> Option<Credentials> {
    if let Some(c) = Credentials::from_env() {
        return Some(c);
    }
    let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".aws/credentials")))?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let pairs = ini_section(&std::fs::read_to_string(file).ok()?, &profile);
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let (key, secret) = (get("aws_access_key_id")?, get("aws_secret_access_key")?);
    Some(match get("aws_session_token") {
        Some(token) => Credentials::new_with_token(key, secret, token),
        None => Credentials::new(key, secret),
    })
}

/// Where a bucket is and how to sign for it.
pub struct Settings {
    /// Path-style addressing at this endpoint; None: AWS itself, virtual-host style.
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: Option<Credentials>,
}

impl Settings {
    /// From the standard AWS environment (see the module's comment).
    pub fn from_env() -> Self {
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into());
        Self { endpoint: std::env::var("AWS_ENDPOINT_URL").ok(), region, credentials: credentials() }
    }
}

impl Bucket {
    /// The bucket and prefix an `s3://BUCKET/PREFIX` URL names, reached as the environment says.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::with_settings(url, Settings::from_env())
    }

    /// The bucket and prefix `url` names, reached with `settings`.
    pub fn with_settings(url: &str, settings: Settings) -> Result<Self> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if name.is_empty() {
            return Err(Error::Invalid(format!("replica URL '{url}': give a bucket, as s3://BUCKET/PREFIX")));
        }
        let region = settings.region;
        let (endpoint, style) = match settings.endpoint {
            Some(endpoint) => (endpoint, UrlStyle::Path),
            None => (format!("https://s3.{region}.amazonaws.com"), UrlStyle::VirtualHost),
        };
        let parsed = endpoint.parse().map_err(|e| Error::Invalid(format!("S3 endpoint '{endpoint}': {e}")))?;
        let bucket = rusty_s3::Bucket::new(parsed, style, name.to_owned(), region)
            .map_err(|e| Error::Invalid(format!("bucket '{name}' at {endpoint}: {e}")))?;
        Ok(Self {
            bucket,
            credentials: settings.credentials,
            prefix: prefix.trim_matches('/').to_owned(),
            url: url.to_owned(),
            agent: agent(endpoint.starts_with("https://"))?,
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.prefix) }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Replica(format!("{}: {what}: {e} (is the endpoint right, and are AWS_* credentials set?)", self.url))
    }

    /// Object `key`, or the `range` of it if given; None for a missing object.
    fn get_object(&self, key: &str, range: Option<(u64, u64)>) -> Result<Option<Vec<u8>>> {
        let full = self.full_key(key);
        let signed = GetObject::new(&self.bucket, self.credentials.as_ref(), &full).sign(SIGNED_FOR);
        self.fetch(signed.as_str(), key, range)
    }

    /// GETs `url`, with `range` if given; None for a missing object.
    fn fetch(&self, signed: &str, key: &str, range: Option<(u64, u64)>) -> Result<Option<Vec<u8>>> {
        let mut request = self.agent.get(signed);
        if let Some((start, len)) = range {
            request = request.header("Range", &format!("bytes={start}-{}", start + len.max(1) - 1));
        }
        let mut response = request.call().map_err(|e| self.failed(key, e))?;
        let status = response.status().as_u16();
        let body =
            response.body_mut().with_config().limit(MAX_ANSWER).read_to_vec().map_err(|e| self.failed(key, e))?;
        match status {
            200 | 206 => Ok(Some(body)),
            404 => Ok(None),
            416 => Ok(Some(Vec::new())), // a range past the end
            _ => Err(self.failed(key, format!("{status} {}", String::from_utf8_lossy(&body).trim()))),
        }
    }
}

/// `text` with its %XX escapes decoded (a malformed escape is kept as it is).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Objects for Bucket {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get_object(key, None)
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>> {
        self.get_object(key, Some((start, len)))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let full = self.full_key(key);
        let signed = PutObject::new(&self.bucket, self.credentials.as_ref(), &full).sign(SIGNED_FOR);
        let mut response = self.agent.put(signed.as_str()).send(bytes).map_err(|e| self.failed(key, e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        Err(self.failed(key, format!("{status} {}", body.trim())))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = if prefix.is_empty() { self.full_key("") } else { format!("{}/", self.full_key(prefix)) };
        let dir = dir.trim_start_matches('/').to_owned();
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, self.credentials.as_ref());
            action.with_prefix(dir.as_str());
            action.with_delimiter("/");
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let signed = action.sign(SIGNED_FOR);
            let body =
                self.fetch(signed.as_str(), prefix, None)?.ok_or_else(|| self.failed("listing", "no such bucket"))?;
            let page = ListObjectsV2::parse_response(&body).map_err(|e| self.failed("listing", e))?;
            // Listings are asked with encoding-type=url: keys come percent-encoded (Garage
            // encodes '/'; moto does not).
            let strip = |k: &str| {
                let k = percent_decoded(k);
                k.strip_prefix(dir.as_str()).map(|n| n.trim_end_matches('/').to_owned())
            };
            names.extend(page.contents.iter().filter_map(|c| strip(&c.key)));
            names.extend(page.common_prefixes.iter().filter_map(|p| strip(&p.prefix)));
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        names.retain(|n| !n.is_empty());
        names.sort();
        names.dedup();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_keys_are_percent_decoded() {
        assert_eq!(percent_decoded("team%2Fab%2Fheads%2F"), "team/ab/heads/");
        assert_eq!(percent_decoded("plain/key"), "plain/key");
        assert_eq!(percent_decoded("bad%zzend%"), "bad%zzend%");
    }
}
