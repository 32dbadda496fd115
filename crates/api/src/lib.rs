//! Ferrovisor's REST API: Firecracker's paths and bodies on a Unix socket, plus Ferrovisor's
//! own under `/ferrovisor/`. The server parses and validates; the VMM's main thread acts on
//! each [`Request`] and answers with a [`Response`].

pub mod client;
pub mod http;
pub mod models;
pub mod routes;
mod strict;

pub use http::{ApiCall, Server};
pub use routes::{ROUTES, Request};

/// An HTTP response: a status, a body and its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    /// 204: done, nothing to say (Firecracker's answer to a successful PUT or PATCH).
    pub fn no_content() -> Self {
        Self { status: 204, body: String::new(), content_type: "application/json", headers: Vec::new() }
    }

    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self { status: 200, body, content_type: "application/json", headers: Vec::new() },
            Err(e) => Self::error(500, format!("The response could not be encoded: {e}.")),
        }
    }

    pub fn text(body: String) -> Self {
        Self { status: 200, body, content_type: "text/plain; version=0.0.4", headers: Vec::new() }
    }

    /// A Firecracker-style error: `{"fault_message": "..."}`. Every error is also logged.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::warn!("API error {status}: {message}");
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Self { status, body, content_type: "application/json", headers: Vec::new() }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The fault message of an error response.
    pub fn fault_message(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        value.get("fault_message")?.as_str().map(str::to_string)
    }
}
