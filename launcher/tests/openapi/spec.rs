//! `launcher/openapi.yaml` read as JSON, and the checks of requests and answers against it.

use std::collections::BTreeSet;
use std::path::Path;

use jsonschema::{Draft, Validator};
use serde_json::{Map, Value};

use crate::common::http::Answer;

/// The keys of an OpenAPI path item that are operations.
const OPERATION_KEYS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// The spec document.
pub struct Spec(Value);

impl Spec {
    /// Reads and parses `launcher/openapi.yaml`.
    pub fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let doc: Value = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        let version = doc["openapi"].as_str().unwrap_or_default();
        // 3.1: its schemas are JSON Schema 2020-12, which is what the validator runs.
        assert!(version.starts_with("3.1."), "openapi: {version:?}");
        Self(doc)
    }

    /// Every (path, METHOD) the spec has an operation for.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let paths = self.0["paths"].as_object().expect("paths is an object");
        paths
            .iter()
            .flat_map(|(path, item)| {
                let item = item.as_object().expect("a path item is an object");
                item.keys()
                    .filter(|key| OPERATION_KEYS.contains(&key.as_str()))
                    .map(move |key| (path.clone(), key.to_uppercase()))
            })
            .collect()
    }

    /// The operation for `method` on `path`.
    pub fn operation(&self, method: &str, path: &str) -> &Value {
        self.0["paths"]
            .get(path)
            .and_then(|item| item.get(method.to_lowercase()))
            .unwrap_or_else(|| panic!("the spec has no operation {method} {path}"))
    }

    /// The names under `components.schemas`.
    pub fn schema_names(&self) -> Vec<String> {
        let schemas = self.0["components"]["schemas"].as_object();
        schemas
            .expect("components.schemas")
            .keys()
            .cloned()
            .collect()
    }

    /// `value`, or what its `$ref` (a local `#/...` pointer) points at.
    pub fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            None => value,
            Some(reference) => {
                let pointer = reference
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("{reference} is not a local reference"));
                self.0
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("{reference} points at nothing"))
            }
        }
    }

    /// A validator for `schema`, an object of the spec, with its `#/components/...` references
    /// resolved in the spec; formats (`ipv4`, ...) are checked.
    pub fn validator(&self, schema: &Value) -> Validator {
        let mut root: Map<String, Value> = schema
            .as_object()
            .unwrap_or_else(|| panic!("a schema object, not {schema}"))
            .clone();
        root.insert("components".into(), self.0["components"].clone());
        jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            .build(&Value::Object(root))
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    /// The validator of `components.schemas.NAME`.
    pub fn component(&self, name: &str) -> Validator {
        let reference = format!("#/components/schemas/{name}");
        self.validator(&serde_json::json!({ "$ref": reference }))
    }

    /// The JSON schema of `method path`'s request body, if it takes one.
    pub fn request_schema(&self, method: &str, path: &str) -> Option<&Value> {
        let body = self.operation(method, path).get("requestBody")?;
        let body = self.resolve(body);
        Some(&body["content"]["application/json"]["schema"])
    }

    /// What the spec finds wrong with `body` as `method path`'s request body (empty: nothing).
    pub fn request_errors(&self, method: &str, path: &str, body: &Value) -> Vec<String> {
        let schema = self
            .request_schema(method, path)
            .unwrap_or_else(|| panic!("{method} {path} takes no body in the spec"));
        errors(&self.validator(schema), body)
    }

    /// Asserts that `body` is a request body the spec allows on `method path`.
    pub fn check_request(&self, method: &str, path: &str, body: &Value) {
        let errors = self.request_errors(method, path, body);
        assert!(
            errors.is_empty(),
            "{method} {path}: the request body {body} breaks the spec: {errors:#?}"
        );
    }

    /// Asserts that `answer` is one the spec lists for `method path`: its status is listed,
    /// and its media type, body and headers are that response's.
    pub fn check_answer(&self, method: &str, path: &str, answer: &Answer) {
        let context = format!("{method} {path} -> {} {:?}", answer.status, answer.body);
        let responses = &self.operation(method, path)["responses"];
        let response = responses
            .get(answer.status.to_string())
            .unwrap_or_else(|| panic!("{context}: the spec lists no such status"));
        let response = self.resolve(response);
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for name in headers.keys() {
                assert!(answer.header(name).is_some(), "{context}: no {name} header");
            }
        }
        let Some(content) = response.get("content") else {
            assert!(answer.body.is_empty(), "{context}: the spec says no body");
            return;
        };
        let media = answer
            .header("content-type")
            .unwrap_or_else(|| panic!("{context}: no Content-Type"));
        let media = media.split(';').next().unwrap_or_default().trim();
        let entry = content
            .get(media)
            .unwrap_or_else(|| panic!("{context}: the spec has no {media} body here"));
        let body = if media == "application/json" {
            answer.json()
        } else {
            Value::String(answer.body.clone())
        };
        let errors = errors(&self.validator(&entry["schema"]), &body);
        assert!(errors.is_empty(), "{context}: breaks the spec: {errors:#?}");
    }

    /// Asserts that `answer`, to a request no operation describes (a wrong method, an unknown
    /// path), is the spec's `Error`.
    pub fn check_error_answer(&self, answer: &Answer) {
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let errors = errors(&self.component("Error"), &answer.json());
        assert!(errors.is_empty(), "{:?}: {errors:#?}", answer.body);
    }

    /// The JSON schema objects (not references) reachable from `schema`, each with the path of
    /// the place in a document it describes.
    pub fn object_schemas<'a>(&'a self, schema: &'a Value) -> Vec<(Vec<Step>, &'a Value)> {
        let mut found = Vec::new();
        self.walk(schema, Vec::new(), &mut found);
        found
    }

    fn walk<'a>(
        &'a self,
        schema: &'a Value,
        at: Vec<Step>,
        found: &mut Vec<(Vec<Step>, &'a Value)>,
    ) {
        let schema = self.resolve(schema);
        if let Some(items) = schema.get("items") {
            let mut inner = at.clone();
            inner.push(Step::Item);
            self.walk(items, inner, found);
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                let mut inner = at.clone();
                inner.push(Step::Field(name.clone()));
                self.walk(property, inner, found);
            }
            found.push((at, schema));
        }
    }
}

/// A step into a JSON document.
#[derive(Clone, Debug)]
pub enum Step {
    /// An object's field.
    Field(String),
    /// An array's element.
    Item,
}

/// The document that is `leaf` at `at` and has nothing else.
pub fn nest(at: &[Step], leaf: Value) -> Value {
    let Some((first, rest)) = at.split_first() else {
        return leaf;
    };
    let inner = nest(rest, leaf);
    match first {
        Step::Item => Value::Array(vec![inner]),
        Step::Field(name) => serde_json::json!({ name.as_str(): inner }),
    }
}

/// The validator's complaints about `instance`, each with where it is.
pub fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}
