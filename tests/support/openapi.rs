//! Checks an answer of the HTTP API against its OpenAPI document: the
//! route and method are documented (or the answer is `404 not_found` /
//! `405 method_not_allowed`), the status is one the operation documents,
//! the body fits the documented schema, and an error's code is one of the
//! examples documented for that status.
//!
//! The schema check covers what the document uses (`$ref`, `type`,
//! `enum`, `properties`, `required`, `additionalProperties`, `items`,
//! `oneOf`/`anyOf`/`allOf`, `minimum`/`maximum`), and is stricter than JSON
//! Schema on one point: an object may carry only the properties its schema
//! names (unless it has `additionalProperties`), so a field added to a
//! response without documenting it fails.

use serde_json::Value;
use std::sync::OnceLock;

/// The document as the API serves it.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(callbridge::api::openapi::json()).expect("the OpenAPI document is JSON"))
}

/// The documented path template `path` (no query) falls under, if any.
pub fn template_of(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('/').collect();
    document()["paths"].as_object()?.keys().map(String::as_str).find(|template| {
        let t: Vec<&str> = template.split('/').collect();
        t.len() == segments.len()
            && t.iter().zip(&segments).all(|(t, s)| (t.starts_with('{') && !s.is_empty()) || t == s)
    })
}

/// Panics unless `status` and `body` are what the document allows for
/// `method` on `uri` (path and query). A body that was not JSON is passed
/// as a JSON string.
pub fn check(method: &str, uri: &str, status: u16, body: &Value) {
    if let Err(e) = verify(method, uri, status, body) {
        panic!("{method} {uri} answered {status} {body}, which the OpenAPI document does not allow: {e}");
    }
}

/// What [`check`] checks, as a result.
pub fn verify(method: &str, uri: &str, status: u16, body: &Value) -> Result<(), String> {
    let doc = document();
    let path = uri.split('?').next().unwrap_or(uri);
    let envelope = |code: &str| -> Result<(), String> {
        validate(&serde_json::json!({"$ref": "#/components/schemas/ErrorBody"}), body, "body")?;
        match body["error"]["code"].as_str() {
            Some(c) if c == code => Ok(()),
            other => Err(format!("expected the error code {code}, got {other:?}")),
        }
    };
    let Some(template) = template_of(path) else {
        return if status == 404 { envelope("not_found") } else { Err("no documented route has this path".into()) };
    };
    let Some(op) = doc["paths"][template].get(method.to_ascii_lowercase()) else {
        return if status == 405 { envelope("method_not_allowed") } else { Err(format!("{template} has no {method}")) };
    };
    let response =
        op["responses"].get(status.to_string()).ok_or_else(|| format!("{method} {template} documents no {status}"))?;
    let content = response["content"].as_object().ok_or_else(|| format!("{status} documents no content"))?;
    if let Some(json) = content.get("application/json") {
        validate(&json["schema"], body, "body")?;
        if let (Some(examples), Some(code)) = (json["examples"].as_object(), body["error"]["code"].as_str()) {
            if !examples.contains_key(code) {
                let documented: Vec<&String> = examples.keys().collect();
                return Err(format!("error code {code} is not documented for {status} (only {documented:?})"));
            }
        }
        Ok(())
    } else if content.keys().any(|k| ["text/plain", "text/event-stream", "text/html"].iter().any(|t| k.starts_with(t)))
    {
        body.is_string().then_some(()).ok_or_else(|| "a text body was expected".into())
    } else {
        Err(format!("{status} documents no content type the test knows: {:?}", content.keys()))
    }
}

fn resolve(reference: &str) -> Result<&'static Value, String> {
    let name =
        reference.strip_prefix("#/components/schemas/").ok_or_else(|| format!("unsupported $ref {reference}"))?;
    document()["components"]["schemas"].get(name).ok_or_else(|| format!("$ref to a missing schema {reference}"))
}

fn type_fits(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

/// `v` against `schema`; the error names where (`at`) and why.
pub fn validate(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        validate(resolve(r)?, v, at)?;
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let errors: Vec<String> = options.iter().filter_map(|s| validate(s, v, at).err()).collect();
            if errors.len() == options.len() {
                return Err(format!("{at}: fits none of {key}: {}", errors.join(" | ")));
            }
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(s, v, at)?;
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() && !types.iter().any(|t| type_fits(t, v)) {
        return Err(format!("{at}: {v} is not of type {types:?}"));
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            return Err(format!("{at}: {v} is not one of {values:?}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if schema.get("minimum").and_then(Value::as_f64).is_some_and(|m| n < m)
            || schema.get("maximum").and_then(Value::as_f64).is_some_and(|m| n > m)
        {
            return Err(format!("{at}: {n} is out of range"));
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, item) in v.as_array().into_iter().flatten().enumerate() {
            validate(items, item, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(object) = v.as_object() {
        validate_object(schema, object, at)?;
    }
    Ok(())
}

fn validate_object(schema: &Value, object: &serde_json::Map<String, Value>, at: &str) -> Result<(), String> {
    let properties = schema.get("properties").and_then(Value::as_object);
    for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        let name = required.as_str().unwrap_or_default();
        if !object.contains_key(name) {
            return Err(format!("{at}: the required field {name} is missing"));
        }
    }
    let extra = schema.get("additionalProperties");
    for (name, value) in object {
        match (properties.and_then(|p| p.get(name)), extra) {
            (Some(s), _) => validate(s, value, &format!("{at}.{name}"))?,
            (None, Some(Value::Bool(true))) => {}
            (None, Some(s)) if s.is_object() => validate(s, value, &format!("{at}.{name}"))?,
            // Only a schema that describes an object's fields closes it:
            // a bare `$ref` / `oneOf` level leaves that to the level below.
            (None, _) if properties.is_none() => {}
            (None, _) => return Err(format!("{at}: the field {name} is not documented")),
        }
    }
    Ok(())
}

/// Every `$ref` in the document resolves.
pub fn dangling_refs() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    if resolve(r).is_err() {
                        out.push(r.to_string());
                    }
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(document(), &mut out);
    out
}
