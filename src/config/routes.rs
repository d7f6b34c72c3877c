//! `[[routes]]`: each route's match, key source, fixed duplicate answer and its own
//! resolved copy of the `[idempotency]` policy.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};

use super::model::*;
use super::pattern::PathPattern;
use super::raw::{Node, Reader, Section};
use super::validate::policy;
use super::values::*;

pub(super) fn routes(r: &mut Reader, root: &Section, defaults: &Arc<Policy>) -> Vec<Route> {
    let Some(node) = root.get("routes") else {
        return Vec::new();
    };
    let Some(items) = r.array("routes", &node) else {
        return Vec::new();
    };
    let mut out: Vec<Route> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        let name = route_name(item.clone());
        if let Some((name, span)) = name {
            if names.contains(&name) {
                r.error(
                    &format!("{path}.name"),
                    &span,
                    format!("duplicate route name {name:?}"),
                );
            }
            names.push(name);
        }
        if let Some(route) = route(r, &path, item, defaults) {
            out.push(route);
        }
    }
    out
}

/// A route's name and where it stands, read without reporting (route() reports).
fn route_name(node: Node) -> Option<(String, std::ops::Range<usize>)> {
    let toml::de::DeValue::Table(t) = node.value else {
        return None;
    };
    let (_, v) = t.iter().find(|(k, _)| k.get_ref().as_ref() == "name")?;
    match v.get_ref() {
        toml::de::DeValue::String(s) => Some((s.to_string(), v.span())),
        _ => None,
    }
}

fn route(r: &mut Reader, path: &str, node: Node, defaults: &Arc<Policy>) -> Option<Route> {
    let sec = r.section(path, Some(node));
    let name = required(r, &sec, "name", string);
    let methods = opt(r, &sec, "methods", methods).unwrap_or_else(|| vec![http::Method::POST]);
    let pattern = required(r, &sec, "path", |r, p, n| {
        let s = r.string(p, n)?;
        PathPattern::parse(&s)
            .map_err(|e| r.error(p, &n.span, e))
            .ok()
    });
    let policy = Arc::new(policy(r, &sec, defaults));
    let key = match sec.get("key") {
        Some(n) => key_source(r, &sec.key_path("key"), n),
        None => Some(KeySource::Header(policy.key_header.clone())),
    };
    let duplicate_response = match sec.get("duplicate_response") {
        Some(n) => Some(duplicate_response(
            r,
            &sec.key_path("duplicate_response"),
            n,
        )?),
        None => None,
    };
    Some(Route {
        name: Arc::from(name?.as_str()),
        methods,
        path: pattern?,
        key: key?,
        policy,
        duplicate_response,
    })
}

fn key_source(r: &mut Reader, path: &str, node: Node) -> Option<KeySource> {
    if !matches!(node.value, toml::de::DeValue::Table(_)) {
        return r.expected(
            path,
            &node,
            "a table { header = \"NAME\" } or { json_pointer = \"/id\" }",
        );
    }
    let sec = r.section(path, Some(node));
    let given =
        usize::from(sec.get("header").is_some()) + usize::from(sec.get("json_pointer").is_some());
    let header = opt(r, &sec, "header", request_header);
    let pointer = opt(r, &sec, "json_pointer", |r, p, n| {
        let s = r.string(p, n)?;
        if !(s.is_empty() || s.starts_with('/')) {
            r.error(
                p,
                &n.span,
                format!("{s:?} is not a JSON pointer (RFC 6901): it must start with '/'"),
            );
            return None;
        }
        Some(s)
    });
    match (header, pointer) {
        (Some(h), None) => Some(KeySource::Header(h)),
        (None, Some(p)) => Some(KeySource::JsonPointer(p)),
        _ if given == 1 => None,
        _ => {
            let span = sec.span.clone();
            r.error(
                path,
                &span,
                "give exactly one of { header = \"NAME\" } or { json_pointer = \"/id\" }",
            );
            None
        }
    }
}

fn duplicate_response(r: &mut Reader, path: &str, node: Node) -> Option<DuplicateResponse> {
    let sec = r.section(path, Some(node));
    let status = opt(r, &sec, "status", final_status).unwrap_or(StatusCode::OK);
    let body = opt(r, &sec, "body", string).unwrap_or_default();
    let content_type = opt(r, &sec, "content_type", |r, p, n| {
        let s = r.string(p, n)?;
        HeaderValue::from_str(&s)
            .map_err(|_| r.error(p, &n.span, "invalid header value"))
            .ok()
    });
    Some(DuplicateResponse {
        status,
        body: body.into(),
        content_type: content_type.unwrap_or(HeaderValue::from_static("application/json")),
    })
}
