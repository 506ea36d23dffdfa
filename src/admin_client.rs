//! A typed client of the coordinator's admin API, used by the operator CLI and the demo.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::https_client::{ClientError, Endpoint, Request};

/// Where the CLI finds the coordinator: flags, else these environment variables.
pub const ENV_ADMIN_URL: &str = "EDGECARD_ADMIN_URL";
pub const ENV_ADMIN_TOKEN: &str = "EDGECARD_ADMIN_TOKEN";
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:7070";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Transport(#[from] ClientError),
    /// The coordinator answered with an error: its code and message.
    #[error("{message} ({code}, HTTP {status})")]
    Api { status: u16, code: String, message: String },
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(String),
}

#[derive(Clone)]
pub struct AdminClient {
    endpoint: Endpoint,
    token: String,
}

impl AdminClient {
    pub fn new(url: &str, token: &str) -> Result<Self, AdminError> {
        Ok(AdminClient { endpoint: Endpoint::parse(url, None)?, token: token.to_string() })
    }

    async fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T, AdminError> {
        let request = request.header("authorization", &format!("Bearer {}", self.token));
        let response = self.endpoint.request(request).await?;
        if !(200..300).contains(&response.status) {
            let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
            return Err(AdminError::Api {
                status: response.status,
                code: body["error"]["code"].as_str().unwrap_or("error").to_string(),
                message: body["error"]["message"].as_str().unwrap_or("request failed").to_string(),
            });
        }
        serde_json::from_slice(&response.body).map_err(|e| AdminError::Decode(e.to_string()))
    }

    pub async fn get(&self, path: &str) -> Result<Value, AdminError> {
        self.call(Request::get(path)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, AdminError> {
        self.call(Request::post_json(path, body)).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Value, AdminError> {
        let request = Request::new(http::Method::PUT, path).header("content-type", "application/json");
        self.call(request.body(body.to_string())).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, AdminError> {
        self.call(Request::new(http::Method::DELETE, path)).await
    }

    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<Value, AdminError> {
        self.call(Request::post(path).header("content-type", "text/plain; charset=utf-8").body(body)).await
    }
}
