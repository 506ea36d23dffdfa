//! Orders: the stored records, and the engine that ties them to
//! the durable store.

pub mod engine;
pub mod record;

pub use engine::{
    CreateOrder, CreatedOrder, GrantInstallError, GrantOutcome, OrderEngine, OrderError, PaymentConfirmation,
    PaymentOutcome, SliceStatus,
};
pub use record::{OrderRecord, OrderStatus, PaymentAttempt};
