//! Orders: the stored records, and the engine that ties them to
//! the durable store.

pub mod engine;
pub mod record;
mod restore;

pub use engine::{
    CreateOrder, CreatedOrder, GrantInstallError, GrantOutcome, OrderEngine, OrderError, PaymentConfirmation,
    PaymentOutcome, SliceStatus, Startup,
};
pub use record::{OrderRecord, OrderStatus, PaymentAttempt};
