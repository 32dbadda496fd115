//! Every operation of Firecracker's own API definition (v1.17, listed in data/) is served, and
//! each with a body that sets every field the definition gives it is accepted by the parser.
//! The operations whose effect Ferrovisor refuses (vhost-user drives, Uffd) are not among the
//! examples: they parse and are then answered with a sentence by the VMM.

use serde_json::Value;

fn operations() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/firecracker-v1.17.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture")).expect("JSON");
    doc["operations"].as_array().expect("a list").clone()
}

/// The path with its `{parameter}` filled from the body's field of that name (or "x").
fn concrete(template: &str, body: Option<&Value>) -> String {
    template
        .split('/')
        .map(|part| match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) => body.and_then(|b| b[name].as_str()).unwrap_or("x").to_string(),
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn every_operation_of_firecrackers_definition_is_routed() {
    let ours: Vec<(&str, &str)> = api::ROUTES.to_vec();
    let mut missing = Vec::new();
    for op in operations() {
        let (method, path) = (op["method"].as_str().unwrap(), op["path"].as_str().unwrap());
        if !ours.contains(&(method, path)) {
            missing.push(format!("{method} {path}"));
        }
    }
    assert!(missing.is_empty(), "Firecracker's operations Ferrovisor does not serve: {missing:?}");
}

#[test]
fn every_example_body_of_firecrackers_definition_is_accepted() {
    let mut refused = Vec::new();
    for op in operations() {
        let method = op["method"].as_str().unwrap();
        let body = op.get("body");
        let path = concrete(op["path"].as_str().unwrap(), body);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        if let Err(response) = api::routes::parse(method, &path, bytes.as_bytes()) {
            refused.push(format!("{method} {path} {bytes}: {} {}", response.status, response.body));
        }
    }
    assert!(refused.is_empty(), "bodies refused:\n{}", refused.join("\n"));
}
