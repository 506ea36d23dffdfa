//! The Edgecard coordinator: master inventory, ledger, slice planner, QUIC server and admin API.
//!
//! Nothing is implemented here yet; nodes run standalone from signed grant files until the
//! coordinator work lands (see ARCHITECTURE.md).
