//! Reads the TOML document with spans, so that every error can name its key path and
//! line, and so that one pass reports every error of a file instead of the first.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;

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

/// Collects errors while the validator walks the document, and remembers which keys of
/// every table it opened were asked for: [`Reader::finish`] reports the others as
/// unknown, so the accepted schema is exactly what the code reads.
pub struct Reader<'s> {
    src: &'s str,
    pub errors: Vec<ConfigError>,
    opened: Vec<Opened>,
}

/// A table's keys as written, and the keys the validator asked it for.
struct Opened {
    path: String,
    keys: Vec<(String, Range<usize>)>,
    asked: Rc<RefCell<Vec<String>>>,
}

/// A value in the document with where it came from.
#[derive(Clone)]
pub struct Node<'a, 'i> {
    pub value: &'a DeValue<'i>,
    pub span: Range<usize>,
}

/// A table being read; every key looked up through it counts as known.
pub struct Section<'a, 'i> {
    pub path: String,
    pub span: Range<usize>,
    table: Option<&'a DeTable<'i>>,
    asked: Rc<RefCell<Vec<String>>>,
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
            opened: Vec::new(),
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

    /// Opens `node` (or an empty table when absent) as a section.
    pub fn section<'a, 'i>(&mut self, path: &str, node: Option<Node<'a, 'i>>) -> Section<'a, 'i> {
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
        self.open(path, span, table)
    }

    /// The document itself as a section.
    pub fn root<'a, 'i>(&mut self, doc: &'a Spanned<DeTable<'i>>) -> Section<'a, 'i> {
        self.open("", doc.span(), Some(doc.get_ref()))
    }

    fn open<'a, 'i>(
        &mut self,
        path: &str,
        span: Range<usize>,
        table: Option<&'a DeTable<'i>>,
    ) -> Section<'a, 'i> {
        let asked = Rc::new(RefCell::new(Vec::new()));
        if let Some(t) = table {
            let keys = t
                .iter()
                .map(|(k, _)| (k.get_ref().to_string(), k.span()))
                .collect();
            self.opened.push(Opened {
                path: path.to_string(),
                keys,
                asked: asked.clone(),
            });
        }
        Section {
            path: path.to_string(),
            span,
            table,
            asked,
        }
    }

    /// Reports every key of every opened table that the validator never asked for.
    pub fn finish(&mut self) {
        for opened in std::mem::take(&mut self.opened) {
            let asked = opened.asked.borrow();
            let expected: Vec<&str> = asked.iter().map(String::as_str).collect();
            for (key, span) in &opened.keys {
                if !asked.contains(key) {
                    let msg = format!("unknown key (expected one of: {})", expected.join(", "));
                    self.error(&join(&opened.path, key), span, msg);
                }
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
            DeValue::Integer(i) => {
                let digits = i.as_str().replace('_', "");
                let parsed = i64::from_str_radix(&digits, i.radix()).ok();
                parsed.or_else(|| {
                    let msg = format!("{} is out of range", i.as_str());
                    self.error(path, &node.span, msg);
                    None
                })
            }
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
        let mut asked = self.asked.borrow_mut();
        if !asked.iter().any(|k| k == key) {
            asked.push(key.to_string());
        }
        drop(asked);
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
