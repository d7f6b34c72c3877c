//! Route path patterns: exact segments, `{param}` segments and a final `{*rest}` tail.
//! Checked at load, matched per request without allocation.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Tail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(source: &str) -> Result<Self, String> {
        let rest = source
            .strip_prefix('/')
            .ok_or_else(|| format!("path {source:?} must start with '/'"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            segments.push(Self::segment(source, part, last)?);
        }
        Ok(PathPattern {
            source: source.to_string(),
            segments,
        })
    }

    fn segment(source: &str, part: &str, last: bool) -> Result<Segment, String> {
        if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            let (tail, name) = match inner.strip_prefix('*') {
                Some(name) => (true, name),
                None => (false, inner),
            };
            let valid_name =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(format!("path {source:?}: bad parameter name in {part:?}"));
            }
            if tail && !last {
                return Err(format!(
                    "path {source:?}: a {{*{name}}} tail must be the last segment"
                ));
            }
            return Ok(if tail { Segment::Tail } else { Segment::Param });
        }
        if part.contains(['{', '}']) {
            return Err(format!(
                "path {source:?}: a parameter must fill a whole segment, found {part:?}"
            ));
        }
        if part.contains(['?', '#']) {
            return Err(format!(
                "path {source:?}: no query or fragment in a route path"
            ));
        }
        Ok(Segment::Literal(part.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// `path` is the request's path without its query.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Tail => return true,
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
                Segment::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_param_and_tail() {
        let p = PathPattern::parse("/v1/orders").unwrap(); // ok: test
        assert!(p.matches("/v1/orders"));
        assert!(!p.matches("/v1/orders/1"));
        assert!(!p.matches("/v1/order"));
        let p = PathPattern::parse("/v1/orders/{id}/refund").unwrap(); // ok: test
        assert!(p.matches("/v1/orders/42/refund"));
        assert!(!p.matches("/v1/orders//refund"));
        assert!(!p.matches("/v1/orders/42"));
        let p = PathPattern::parse("/files/{*rest}").unwrap(); // ok: test
        assert!(p.matches("/files/a/b/c"));
        assert!(p.matches("/files/"));
        assert!(!p.matches("/file"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(PathPattern::parse("v1").is_err());
        assert!(PathPattern::parse("/a/{*rest}/b").is_err());
        assert!(PathPattern::parse("/a/x{id}").is_err());
        assert!(PathPattern::parse("/a/{}").is_err());
        assert!(PathPattern::parse("/a?b=1").is_err());
    }
}
