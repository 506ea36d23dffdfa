//! Orders: the stored records, and the engine that ties them to
//! the durable store.

pub mod binding;
pub mod email_index;
pub mod engine;
mod find;
mod forget;
pub mod record;
mod record_v1;
pub mod refunds;
mod restore;

pub use engine::{
    CreateOrder, CreatedOrder, GrantInstallError, GrantOutcome, OrderEngine, OrderError, PaymentConfirmation,
    PaymentOutcome, SliceStatus, Startup,
};
pub use find::FindRefusal;
pub use record::{
    AttemptRef, DisputeRecord, OrderRecord, OrderStatus, PaymentAttempt, PaymentProblem, PaymentProblemKind,
    RefundRecord, RefundState, MAX_PAYMENT_ATTEMPTS,
};
pub use refunds::{ProviderReport, RefundStart};
