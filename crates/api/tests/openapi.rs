//! The OpenAPI document in docs/api matches the routes the server has, and every request body
//! it describes, with all its fields, is one the server accepts.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

fn document() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/api/openapi.json")).expect("valid JSON")
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("local reference");
            doc.pointer(pointer).unwrap_or_else(|| panic!("{reference} resolves"))
        }
        None => schema,
    }
}

/// A value with every documented property: its example if it has one, else strings "x",
/// numbers 3, the first enum value.
fn sample(doc: &Value, schema: &Value) -> Value {
    let schema = resolve(doc, schema);
    if let Some(example) = schema.get("example") {
        return example.clone();
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut object = Map::new();
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                object.insert(name.clone(), sample(doc, property));
            }
            Value::Object(object)
        }
        Some("array") => json!([sample(doc, &schema["items"])]),
        Some("string") => json!("x"),
        Some("integer") => json!(schema.get("minimum").and_then(Value::as_u64).unwrap_or(3).max(3)),
        Some("boolean") => json!(false),
        _ => Value::Null,
    }
}

#[test]
fn documented_routes_are_the_servers_routes() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().expect("path item") {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut served: Vec<(String, String)> = api::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    served.sort();
    assert_eq!(documented, served, "docs/api/openapi.json and api::ROUTES differ");
}

#[test]
fn every_documented_body_is_accepted_with_all_its_fields() {
    let doc = document();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let target =
                path.replace("{drive_id}", "x").replace("{iface_id}", "x").replace("{id}", "x").replace("{tag}", "x");
            let body = match operation.pointer("/requestBody/content/application~1json/schema") {
                Some(schema) => sample(&doc, schema).to_string(),
                None => String::new(),
            };
            let parsed = api::routes::parse(&method.to_uppercase(), &target, body.as_bytes());
            assert!(parsed.is_ok(), "{method} {path} with {body}: {:?}", parsed.err().and_then(|r| r.fault_message()));
            for code in operation["responses"].as_object().expect("responses").keys() {
                assert!(code == "default" || code.parse::<u16>().is_ok(), "{method} {path}: response {code}");
            }
        }
    }
}

#[test]
fn document_passes_an_openapi_validator() {
    // scripts/test.sh installs openapi-spec-validator (PyPI) here; CI must have it.
    let home = std::env::var("HOME").unwrap_or_default();
    let validator = PathBuf::from(home).join(".cache/ferrovisor/openapi-validator");
    if !validator.exists() {
        // scripts/test.sh (which CI runs) installs it and says so: there, missing is a failure.
        assert!(
            std::env::var_os("FERROVISOR_TEST_SCRIPT").is_none() && std::env::var_os("CI").is_none(),
            "scripts/test.sh installs openapi-spec-validator; it is missing from {}",
            validator.display()
        );
        eprintln!("skipped: openapi-spec-validator is not installed in {}", validator.display());
        return;
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .env("PYTHONPATH", &validator)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
