//! Reads the TOML document with spans, so that every error can name its key path and
//! line, and so that one pass reports every error of a file instead of the first.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "line {}: {}", self.line, self.message)
        } else {
            write!(f, "line {}: {}: {}", self.line, self.path, self.message)
        }
    }
}

/// Collects errors while the validator walks the document.
pub struct Reader<'s> {
    src: &'s str,
    pub errors: Vec<ConfigError>,
}

/// A value in the document with where it came from.
#[derive(Clone)]
pub struct Node<'a, 'i> {
    pub value: &'a DeValue<'i>,
    pub span: Range<usize>,
}

/// A table whose unknown keys have already been reported.
pub struct Section<'a, 'i> {
    pub path: String,
    pub span: Range<usize>,
    table: Option<&'a DeTable<'i>>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'s> Reader<'s> {
    pub fn new(src: &'s str) -> Self {
        Reader {
            src,
            errors: Vec::new(),
        }
    }

    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    pub fn error(&mut self, path: &str, span: &Range<usize>, message: impl Into<String>) {
        let line = self.line_of(span.start);
        self.errors.push(ConfigError {
            line,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Opens `node` (or an empty table when absent) as a section allowing `allowed` keys.
    pub fn section<'a, 'i>(
        &mut self,
        path: &str,
        node: Option<Node<'a, 'i>>,
        allowed: &[&str],
    ) -> Section<'a, 'i> {
        let span = node.as_ref().map(|n| n.span.clone()).unwrap_or(0..0);
        let table = match node.as_ref().map(|n| n.value) {
            None => None,
            Some(DeValue::Table(t)) => Some(t),
            Some(_) => {
                if let Some(n) = &node {
                    self.expected::<()>(path, n, "a table");
                }
                None
            }
        };
        if let Some(t) = table {
            self.check_keys(path, t, allowed);
        }
        Section {
            path: path.to_string(),
            span,
            table,
        }
    }

    /// The document itself as a section allowing `allowed` top-level keys.
    pub fn root<'a, 'i>(
        &mut self,
        doc: &'a Spanned<DeTable<'i>>,
        allowed: &[&str],
    ) -> Section<'a, 'i> {
        self.check_keys("", doc.get_ref(), allowed);
        Section {
            path: String::new(),
            span: doc.span(),
            table: Some(doc.get_ref()),
        }
    }

    fn check_keys(&mut self, path: &str, table: &DeTable, allowed: &[&str]) {
        for (key, _) in table.iter() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                let msg = format!("unknown key (expected one of: {})", allowed.join(", "));
                self.error(&join(path, key.get_ref()), &key.span(), msg);
            }
        }
    }

    pub fn string(&mut self, path: &str, node: &Node) -> Option<String> {
        match node.value {
            DeValue::String(s) => Some(s.to_string()),
            _ => self.expected(path, node, "a string"),
        }
    }

    pub fn bool(&mut self, path: &str, node: &Node) -> Option<bool> {
        match node.value {
            DeValue::Boolean(b) => Some(*b),
            _ => self.expected(path, node, "true or false"),
        }
    }

    pub fn integer(&mut self, path: &str, node: &Node) -> Option<i64> {
        match node.value {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => self.expected(path, node, "an integer"),
        }
    }

    pub fn array<'a, 'i>(&mut self, path: &str, node: &Node<'a, 'i>) -> Option<Vec<Node<'a, 'i>>> {
        match node.value {
            DeValue::Array(items) => Some(items.iter().map(node_of).collect()),
            _ => self.expected(path, node, "an array"),
        }
    }

    pub fn expected<T>(&mut self, path: &str, node: &Node, what: &str) -> Option<T> {
        let found = match node.value {
            DeValue::String(_) => "a string",
            DeValue::Integer(_) => "an integer",
            DeValue::Float(_) => "a float",
            DeValue::Boolean(_) => "a boolean",
            DeValue::Datetime(_) => "a datetime",
            DeValue::Array(_) => "an array",
            DeValue::Table(_) => "a table",
        };
        self.error(path, &node.span, format!("expected {what}, found {found}"));
        None
    }
}

fn node_of<'a, 'i>(v: &'a Spanned<DeValue<'i>>) -> Node<'a, 'i> {
    Node {
        value: v.get_ref(),
        span: v.span(),
    }
}

impl<'a, 'i> Section<'a, 'i> {
    pub fn get(&self, key: &str) -> Option<Node<'a, 'i>> {
        self.table?
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| node_of(v))
    }

    pub fn key_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    pub fn is_present(&self) -> bool {
        self.table.is_some()
    }
}
