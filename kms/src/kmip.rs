//! KEKs from KMIP key management servers, over mutual TLS.
//!
//! Servers listed in the configuration form one cluster that replicates
//! the same keys; they are tried in order. A key is found by the unique
//! identifier recorded at creation; a server that knows it under another
//! identifier (a replica) is asked by the key's name instead. Fetching a
//! key costs one TLS connection and two requests (Get Attributes for its
//! State and Name, then Get).
//!
//! Built on the `kmip-protocol` crate's synchronous client (its async
//! futures are not `Send`) over our own rustls 0.23 connection (`tls`).
//! Its limits shape this module: Get Attributes with explicit names, no key
//! wrapping on Get.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kmip_protocol::types::common::{
    AttributeName, AttributeValue, CryptographicAlgorithm, KeyMaterial, ObjectType,
    RevocationReasonCode, State, UniqueIdentifier,
};
use kmip_protocol::types::request::{
    self, Attribute, QueryFunction, RequestPayload, RevocationReason, TemplateAttribute,
};
use kmip_protocol::types::response::{self as resp, ResponsePayload};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::tls::{ConnectError, TlsClient};
use crate::wire::{Wire, WireError};
use crate::{Kek, KeyProvider, KeyState, KmsError, KEK_LEN};

/// Encrypt | Decrypt | Wrap Key | Unwrap Key.
const USAGE_MASK: i32 = 0x04 | 0x08 | 0x10 | 0x20;

/// The `[kms]` table of a KMS configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmipConfig {
    /// `host:port` of each server of the cluster, tried in order.
    pub servers: Vec<String>,
    /// CA certificate (PEM) that signed the servers' certificates.
    pub ca: PathBuf,
    /// Client certificate and key (PEM) vmcrypt authenticates with.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Per-request timeout (connect, read, write), in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The name to verify the servers' certificates against, when it is not
    /// the host name in `servers`.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_timeout_ms() -> u64 {
    5000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    kms: KmipConfig,
}

impl KmipConfig {
    /// Reads a configuration file; relative paths are taken from its folder.
    pub fn load(path: &Path) -> Result<KmipConfig, KmsError> {
        let err = |reason: String| KmsError::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut cfg = toml::from_str::<ConfigFile>(&text)
            .map_err(|e| err(e.to_string()))?
            .kms;
        if cfg.servers.is_empty() {
            return Err(err("no servers listed".into()));
        }
        for s in &cfg.servers {
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(err(format!("server '{s}' is not host:port")));
            };
            if port.parse::<u16>().is_err() || host.is_empty() {
                return Err(err(format!("server '{s}' is not host:port")));
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.client_cert, &mut cfg.client_key] {
            if p.is_relative() {
                *p = dir.join(&p);
            }
        }
        Ok(cfg)
    }
}

pub struct KmipProvider {
    cfg: KmipConfig,
    /// Mutual TLS set up once from the configured files.
    tls: TlsClient,
    /// How long to keep retrying when no server answers.
    deadline: Duration,
}

/// One server's answer to a connection attempt, for `kms check`.
#[derive(Debug)]
pub struct ServerCheck {
    pub server: String,
    pub result: Result<String, String>,
}

fn state_of(s: &State) -> KeyState {
    match s {
        State::PreActive => KeyState::PreActive,
        State::Active => KeyState::Active,
        State::Deactivated => KeyState::Deactivated,
        State::Compromised => KeyState::Compromised,
        State::Destroyed => KeyState::Destroyed,
        State::DestroyedCompromised => KeyState::DestroyedCompromised,
        // A state newer than this client knows is not one to use a key in.
        _ => KeyState::Compromised,
    }
}

impl KmipProvider {
    pub fn new(cfg: KmipConfig, deadline: Duration) -> Result<Self, KmsError> {
        if std::env::var_os("SSLKEYLOGFILE").is_some() {
            return Err(KmsError::Unsupported(
                "SSLKEYLOGFILE is set: it would write TLS session secrets to disk; unset it".into(),
            ));
        }
        let tls = TlsClient::from_files(&cfg.ca, &cfg.client_cert, &cfg.client_key)?;
        Ok(KmipProvider { cfg, tls, deadline })
    }

    pub fn from_file(path: &Path, deadline: Duration) -> Result<Self, KmsError> {
        Self::new(KmipConfig::load(path)?, deadline)
    }

    pub fn servers(&self) -> &[String] {
        &self.cfg.servers
    }

    /// Connects to `server` and runs `f` on the connection.
    fn on_server<T>(
        &self,
        server: &str,
        f: &dyn Fn(&dyn Kmip) -> Result<T, KmsError>,
    ) -> Result<T, KmipAttempt> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let (host, _) = server.rsplit_once(':').expect("checked in load");
        let name = self.cfg.server_name.as_deref().unwrap_or(host);
        let addrs: Vec<_> = server
            .to_socket_addrs()
            .map_err(|e| KmipAttempt::Retry(format!("{server}: {e}")))?
            .collect();
        let mut last = None;
        let tcp = addrs
            .iter()
            .find_map(|a| match TcpStream::connect_timeout(a, timeout) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = Some(e);
                    None
                }
            })
            .ok_or_else(|| {
                KmipAttempt::Retry(format!(
                    "{server}: I/O error: {}",
                    last.map_or("no address".to_string(), |e| e.to_string())
                ))
            })?;
        let io = |e: std::io::Error| KmipAttempt::Retry(format!("{server}: {e}"));
        tcp.set_read_timeout(Some(timeout)).map_err(io)?;
        tcp.set_write_timeout(Some(timeout)).map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let tls = self.tls.connect(tcp, name).map_err(|e| match e {
            ConnectError::Retry(m) => KmipAttempt::Retry(format!("{server}: {m}")),
            ConnectError::Refused(m) => KmipAttempt::Final(KmsError::Server {
                server: server.into(),
                message: m,
            }),
        })?;
        let client = Wire::new(tls);
        let conn = Conn {
            client: &client,
            server,
        };
        f(&conn).map_err(KmipAttempt::from)
    }

    /// Runs `f` on the first server that answers, retrying with backoff
    /// until the deadline when none does.
    fn with_cluster<T>(&self, f: &dyn Fn(&dyn Kmip) -> Result<T, KmsError>) -> Result<T, KmsError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut last_error = String::new();
            for server in &self.cfg.servers {
                match self.on_server(server, f) {
                    Ok(v) => return Ok(v),
                    Err(KmipAttempt::Final(e)) => return Err(e),
                    Err(KmipAttempt::Retry(msg)) => {
                        tracing::warn!(server, "KMS server unavailable: {msg}");
                        last_error = msg;
                    }
                }
            }
            if start.elapsed() + backoff > self.deadline {
                return Err(KmsError::Unreachable {
                    servers: self.cfg.servers.join(", "),
                    last_error,
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Connects to each server and asks for its protocol versions: the
    /// first thing to run when keys do not come.
    pub fn check(&self) -> Vec<ServerCheck> {
        self.cfg
            .servers
            .iter()
            .map(|server| ServerCheck {
                server: server.clone(),
                result: self
                    .on_server(server, &|k| k.versions())
                    .map_err(|e| match e {
                        KmipAttempt::Retry(m) => m,
                        KmipAttempt::Final(e) => e.to_string(),
                    }),
            })
            .collect()
    }
}

/// What the tests do to a cluster besides what vmcrypt does: not built
/// into the daemon (feature `test-support`, enabled for the workspace's
/// tests only).
#[cfg(feature = "test-support")]
impl KmipProvider {
    /// Stores an existing KEK under `name` at one server (how a test
    /// replicates a key to a second server of a cluster).
    pub fn register_kek(&self, server: &str, name: &str, kek: &Kek) -> Result<String, KmsError> {
        self.on_server(server, &|k| k.register(name, kek))
            .map_err(|e| match e {
                KmipAttempt::Retry(m) => KmsError::Unreachable {
                    servers: server.into(),
                    last_error: m,
                },
                KmipAttempt::Final(e) => e,
            })
    }

    /// Destroys a KEK at the first server that answers.
    pub fn destroy_kek(&self, id: &str) -> Result<(), KmsError> {
        self.with_cluster(&|k| {
            k.revoke(id).ok();
            k.destroy(id)
        })
    }

    /// The state of a key.
    pub fn key_state(&self, id: &str) -> Result<KeyState, KmsError> {
        self.with_cluster(&|k| k.attributes(id).map(|(s, _)| s))
    }
}

enum KmipAttempt {
    Retry(String),
    Final(KmsError),
}

impl From<KmsError> for KmipAttempt {
    /// An unreachable server is worth retrying (or trying the next one);
    /// anything else is the cluster's answer.
    fn from(e: KmsError) -> Self {
        match e {
            KmsError::Unreachable { last_error, .. } => KmipAttempt::Retry(last_error),
            other => KmipAttempt::Final(other),
        }
    }
}

/// What a failed exchange with `server` means.
fn kmip_error(server: &str, e: &WireError) -> KmsError {
    match e {
        WireError::Connection(_) => KmsError::Unreachable {
            servers: server.into(),
            last_error: format!("{server}: {e}"),
        },
        WireError::NotFound(_) | WireError::Server(_) => KmsError::Server {
            server: server.into(),
            message: e.to_string(),
        },
    }
}

/// The KMIP operations vmcrypt uses, on one connection.
trait Kmip {
    fn versions(&self) -> Result<String, KmsError>;
    fn create(&self, name: &str) -> Result<String, KmsError>;
    fn activate(&self, id: &str) -> Result<(), KmsError>;
    fn attributes(&self, id: &str) -> Result<(KeyState, Vec<String>), KmsError>;
    fn locate(&self, name: &str) -> Result<Vec<String>, KmsError>;
    fn get(&self, id: &str) -> Result<Kek, KmsError>;
    fn revoke(&self, id: &str) -> Result<(), KmsError>;
    #[cfg(feature = "test-support")]
    fn destroy(&self, id: &str) -> Result<(), KmsError>;
    #[cfg(feature = "test-support")]
    fn register(&self, name: &str, kek: &Kek) -> Result<String, KmsError>;
}

struct Conn<'a, T> {
    client: &'a Wire<T>,
    server: &'a str,
}

impl<T: Read + Write> Conn<'_, T> {
    fn request(&self, payload: RequestPayload) -> Result<ResponsePayload, KmsError> {
        self.client.request(payload).map_err(|e| self.err(&e))
    }

    fn err(&self, e: &WireError) -> KmsError {
        kmip_error(self.server, e)
    }

    fn unexpected(&self, op: &str) -> KmsError {
        KmsError::Server {
            server: self.server.into(),
            message: format!("unexpected response to {op}"),
        }
    }
}

impl<T: Read + Write> Kmip for Conn<'_, T> {
    fn versions(&self) -> Result<String, KmsError> {
        let versions = match self.request(RequestPayload::DiscoverVersions(vec![]))? {
            ResponsePayload::DiscoverVersions(r) => r
                .supported_versions
                .unwrap_or_default()
                .iter()
                .map(|v| format!("{}.{}", v.major, v.minor))
                .collect::<Vec<_>>(),
            _ => return Err(self.unexpected("Discover Versions")),
        };
        let vendor = match self.request(RequestPayload::Query(vec![
            QueryFunction::QueryServerInformation,
        ]))? {
            ResponsePayload::Query(q) => q.vendor_identification.unwrap_or_default(),
            _ => String::new(),
        };
        Ok(format!("KMIP {}; vendor '{vendor}'", versions.join(", ")))
    }

    fn create(&self, name: &str) -> Result<String, KmsError> {
        let attrs = vec![
            Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
            Attribute::CryptographicLength(KEK_LEN as i32 * 8),
            request::Attribute(
                AttributeName("Cryptographic Usage Mask".into()),
                None,
                AttributeValue::Integer(USAGE_MASK),
            ),
            Attribute::Name(name.into()),
        ];
        match self.request(RequestPayload::Create(
            ObjectType::SymmetricKey,
            TemplateAttribute::unnamed(attrs),
        ))? {
            ResponsePayload::Create(r) => Ok(r.unique_identifier.0),
            _ => Err(self.unexpected("Create")),
        }
    }

    fn activate(&self, id: &str) -> Result<(), KmsError> {
        self.request(RequestPayload::Activate(Some(UniqueIdentifier(id.into()))))
            .map(|_| ())
    }

    fn attributes(&self, id: &str) -> Result<(KeyState, Vec<String>), KmsError> {
        let names = vec![AttributeName("State".into()), AttributeName("Name".into())];
        let r = match self.client.request(RequestPayload::GetAttributes(
            Some(UniqueIdentifier(id.into())),
            Some(names),
        )) {
            Ok(ResponsePayload::GetAttributes(r)) => r,
            Ok(_) => return Err(self.unexpected("Get Attributes")),
            Err(WireError::NotFound(_)) => {
                return Err(KmsError::NotFound {
                    provider: format!("KMS {}", self.server),
                    id: id.into(),
                })
            }
            Err(e) => return Err(self.err(&e)),
        };
        let mut state = None;
        let mut names = Vec::new();
        for a in r.attributes.unwrap_or_default() {
            match a.value {
                AttributeValue::State(s) => state = Some(state_of(&s)),
                AttributeValue::Name(n, _) => names.push(n.0),
                _ => {}
            }
        }
        let state = state.ok_or_else(|| self.unexpected("Get Attributes (no State)"))?;
        Ok((state, names))
    }

    fn locate(&self, name: &str) -> Result<Vec<String>, KmsError> {
        match self.request(RequestPayload::Locate(vec![Attribute::Name(name.into())]))? {
            ResponsePayload::Locate(r) => {
                Ok(r.unique_identifiers.into_iter().map(|u| u.0).collect())
            }
            _ => Err(self.unexpected("Locate")),
        }
    }

    fn get(&self, id: &str) -> Result<Kek, KmsError> {
        let payload = RequestPayload::Get(Some(UniqueIdentifier(id.into())), None, None, None);
        let r = match self.request(payload)? {
            ResponsePayload::Get(r) => r,
            _ => return Err(self.unexpected("Get")),
        };
        let malformed = |reason: &str| KmsError::Malformed {
            provider: format!("KMS {}", self.server),
            id: id.into(),
            reason: reason.into(),
        };
        let resp::ManagedObject::SymmetricKey(key) = r.cryptographic_object else {
            return Err(malformed("not a symmetric key"));
        };
        let KeyMaterial::Bytes(bytes) = key.key_block.key_value.key_material else {
            return Err(malformed("key material is not raw bytes"));
        };
        let bytes = Zeroizing::new(bytes);
        let arr: &[u8; KEK_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(&format!("{} bytes, expected {KEK_LEN}", bytes.len())))?;
        Ok(Kek::from_bytes(arr))
    }

    fn revoke(&self, id: &str) -> Result<(), KmsError> {
        let reason = RevocationReason(RevocationReasonCode::CessationOfOperation, None);
        self.request(RequestPayload::Revoke(
            Some(UniqueIdentifier(id.into())),
            reason,
            None,
        ))
        .map(|_| ())
    }

    #[cfg(feature = "test-support")]
    fn destroy(&self, id: &str) -> Result<(), KmsError> {
        self.request(RequestPayload::Destroy(Some(UniqueIdentifier(id.into()))))
            .map(|_| ())
    }

    #[cfg(feature = "test-support")]
    fn register(&self, name: &str, kek: &Kek) -> Result<String, KmsError> {
        use kmip_protocol::types::common::{CryptographicLength, KeyFormatType};
        use kmip_protocol::types::request::{KeyBlock, KeyValue, ManagedObject, SymmetricKey};
        let attrs = vec![
            request::Attribute(
                AttributeName("Cryptographic Usage Mask".into()),
                None,
                AttributeValue::Integer(USAGE_MASK),
            ),
            Attribute::Name(name.into()),
        ];
        let block = KeyBlock(
            KeyFormatType::Raw,
            None,
            Some(KeyValue(KeyMaterial::Bytes(kek.as_bytes().to_vec()), None)),
            Some(CryptographicAlgorithm::AES),
            Some(CryptographicLength(KEK_LEN as i32 * 8)),
            None,
        );
        let payload = RequestPayload::Register(
            ObjectType::SymmetricKey,
            TemplateAttribute::unnamed(attrs),
            Some(ManagedObject::SymmetricKey(SymmetricKey(block))),
        );
        let id = match self.request(payload)? {
            ResponsePayload::Register(r) => r.unique_identifier.0,
            _ => return Err(self.unexpected("Register")),
        };
        self.activate(&id)?;
        Ok(id)
    }
}

impl KeyProvider for KmipProvider {
    fn describe(&self) -> String {
        format!("KMIP cluster {}", self.cfg.servers.join(", "))
    }

    fn kind(&self) -> &'static str {
        "kmip"
    }

    fn create_kek(&self, name: &str) -> Result<(String, Kek), KmsError> {
        self.with_cluster(&|k| {
            let id = k.create(name)?;
            k.activate(&id)?;
            let kek = k.get(&id)?;
            tracing::info!(key_id = %id, name, "created a key-encryption key at the KMS");
            Ok((id.clone(), kek))
        })
    }

    fn get_kek(&self, id: &str, name: Option<&str>) -> Result<Kek, KmsError> {
        self.with_cluster(&|k| {
            // The recorded id, if this server knows it under the same name.
            let mut key = None;
            match k.attributes(id) {
                Ok((state, names)) if name.is_none_or(|n| names.iter().any(|x| x == n)) => {
                    key = Some((id.to_string(), state))
                }
                Ok(_) | Err(KmsError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            // Else the replica's id for the same name.
            if key.is_none() {
                if let Some(name) = name {
                    if let Some(other) = k.locate(name)?.into_iter().next() {
                        let (state, _) = k.attributes(&other)?;
                        key = Some((other, state));
                    }
                }
            }
            let Some((found, state)) = key else {
                return Err(KmsError::NotFound {
                    provider: self.describe(),
                    id: id.into(),
                });
            };
            if state != KeyState::Active {
                return Err(KmsError::NotActive { id: found, state });
            }
            k.get(&found)
        })
    }

    fn revoke_kek(&self, id: &str) -> Result<(), KmsError> {
        self.with_cluster(&|k| k.revoke(id))
    }
}
