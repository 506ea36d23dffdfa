//! The admin API's mail routes (behind the admin token):
//!
//! | route | answer |
//! |---|---|
//! | `GET /admin/v1/mail` | counts by status, and the mails not yet final (at most 200) |
//! | `GET /admin/v1/mail?order={id}` | that order's mails: kind, status, attempts, last error class |
//! | `POST /admin/v1/mail/forget` `{"email": ADDRESS}` | erases the address from every order holding it, and drops their mail queue records: `{"orders": n}` |
//!
//! No answer carries an address.

use edgecard_protocol::OrderId;
use http::StatusCode;
use serde_json::{json, Value};

use super::queue::{self, MailJob, MailStatus};
use crate::api::{json_response, HttpResponse};
use crate::orders::{OrderEngine, OrderError};
use crate::store::WriteBatch;
use crate::time_fmt::rfc3339;

const MAX_LISTED: usize = 200;

fn job_json(job: &MailJob) -> Value {
    json!({
        "order_id": job.order_id.to_string(), "kind": job.kind.as_str(), "status": job.status.as_str(),
        "attempts": job.attempts, "queued_at": rfc3339(job.queued_at),
        "next_attempt_at": (!job.status.is_final()).then(|| rfc3339(job.next_attempt_at)),
        "finished_at": job.finished_at.map(rfc3339), "last_error": job.last_error,
    })
}

fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": { "code": code, "message": message } }), "no-store")
}

/// `GET /admin/v1/mail[?order=ID]`.
pub fn status(engine: &OrderEngine, query: Option<&str>) -> HttpResponse {
    let order = query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("order=")));
    if let Some(order) = order {
        let Ok(id) = order.parse::<OrderId>() else {
            return error(StatusCode::BAD_REQUEST, "invalid_order_id", "order must be an order id");
        };
        return match queue::jobs_of(engine.store(), &id) {
            Ok(jobs) => json_response(
                StatusCode::OK,
                &json!({ "order_id": id.to_string(), "mails": jobs.iter().map(job_json).collect::<Vec<_>>() }),
                "no-store",
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &format!("store failure: {e}")),
        };
    }
    let jobs = match queue::all_jobs(engine.store()) {
        Ok(jobs) => jobs,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &format!("store failure: {e}")),
    };
    let counts: serde_json::Map<String, Value> = MailStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), json!(jobs.iter().filter(|j| j.status == *s).count())))
        .collect();
    let open: Vec<Value> = jobs.iter().filter(|j| !j.status.is_final()).take(MAX_LISTED).map(job_json).collect();
    json_response(StatusCode::OK, &json!({ "counts": counts, "not_final": open }), "no-store")
}

/// `POST /admin/v1/mail/forget` with `{"email": ADDRESS}`.
pub async fn forget(engine: &OrderEngine, body: &[u8]) -> HttpResponse {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Forget {
        email: String,
    }
    let Ok(request) = serde_json::from_slice::<Forget>(body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_json", "expected {\"email\": ADDRESS}");
    };
    let orders = match engine.orders_with_email(&request.email) {
        Ok(orders) => orders,
        Err(OrderError::BadEmail) => return error(StatusCode::BAD_REQUEST, "invalid_email", "not a mail address"),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string()),
    };
    let mut erased = 0usize;
    for id in &orders {
        let mut batch = WriteBatch::default();
        match queue::jobs_of(engine.store(), id) {
            Ok(jobs) => {
                for job in &jobs {
                    queue::remove(&mut batch, job);
                }
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &format!("store failure: {e}")),
        }
        match engine.forget_email(id, batch).await {
            Ok(true) => erased += 1,
            Ok(false) | Err(OrderError::NotFound) => {}
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string()),
        }
    }
    tracing::info!(orders = erased, "mail address erased on request");
    json_response(StatusCode::OK, &json!({ "orders": erased }), "no-store")
}
