//! Configuration: the TOML file (SPEC §2) read with spans ([`raw`]), checked and typed
//! ([`validate`]) into the values the proxy runs on ([`model`]).

pub mod model;
pub mod pattern;
pub mod raw;
mod routes;
mod store;
mod validate;
pub mod values;

use std::path::{Path, PathBuf};

pub use model::*;
pub use raw::ConfigError;

/// Why a config could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    Read(PathBuf, std::io::Error),
    Invalid(PathBuf, Vec<ConfigError>),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Read(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            LoadError::Invalid(path, errors) => {
                write!(f, "{} has {} error(s):", path.display(), errors.len())?;
                for e in errors {
                    write!(f, "\n  {}: {e}", path.display())?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for LoadError {}

pub fn load(path: &Path) -> Result<Config, LoadError> {
    let src = std::fs::read_to_string(path).map_err(|e| LoadError::Read(path.to_path_buf(), e))?;
    parse(&src).map_err(|errors| LoadError::Invalid(path.to_path_buf(), errors))
}

/// Parses and validates a whole document, returning every error found.
pub fn parse(src: &str) -> Result<Config, Vec<ConfigError>> {
    let mut reader = raw::Reader::new(src);
    let (doc, syntax) = toml::de::DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        let errors = syntax
            .iter()
            .map(|e| ConfigError {
                line: reader.line_of(e.span().map(|s| s.start).unwrap_or(0)),
                path: String::new(),
                message: format!("TOML syntax: {}", e.message()),
            })
            .collect();
        return Err(errors);
    }
    match validate::config(&mut reader, &doc) {
        Some(config) if reader.errors.is_empty() => Ok(config),
        _ => {
            reader.errors.sort_by_key(|e| e.line);
            Err(reader.errors)
        }
    }
}

impl Config {
    /// The first route whose methods and path match.
    pub fn route(&self, method: &http::Method, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path))
    }

    /// Human-readable store and resolved routes for `idemgate check` (credentials masked).
    pub fn describe_routes(&self) -> String {
        let mut out = match (&self.store.backend, &self.store.urls) {
            (Backend::Redis, Some(urls)) => format!(
                "store: redis {urls} (prefix {:?}, lock_lease {})\n",
                self.store.prefix,
                humantime::format_duration(self.store.lock_lease)
            ),
            (Backend::Disk, _) => format!(
                "store: disk {} ({:?}, max_bytes {})\n",
                self.store
                    .path
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display(),
                match self.store.durability {
                    Durability::Relaxed => "relaxed",
                    Durability::Strict => "strict",
                },
                self.store.max_bytes
            ),
            _ => format!("store: memory (max_bytes {})\n", self.store.max_bytes),
        };
        for r in &self.routes {
            let p = &r.policy;
            let methods: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
            out.push_str(&format!(
                "route {:?}: {} {}\n  key: {} (required: {}, length {}..={})\n  ttl: {}, store_statuses: {}, concurrent: {} (wait_timeout {}), mismatch_status: {}\n",
                r.name,
                methods.join("|"),
                r.path.as_str(),
                r.key,
                p.required,
                p.min_key_length,
                p.max_key_length,
                humantime::format_duration(p.ttl),
                p.store_statuses,
                p.concurrent,
                humantime::format_duration(p.wait_timeout),
                p.mismatch_status.as_u16(),
            ));
            if let Some(d) = &r.duplicate_response {
                out.push_str(&format!("  duplicate_response: {}\n", d.status.as_u16()));
            }
        }
        if self.routes.is_empty() {
            out.push_str("no routes: every request is proxied untouched\n");
        }
        out
    }
}
