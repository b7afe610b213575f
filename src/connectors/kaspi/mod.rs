//! The Kaspi Shop API connector: the client (headers, 14-day windows, pages,
//! transitions with a re-read first), error classification, the derivation of
//! status keys, and the conversion of JSON:API resources into domain orders.
//! Wire types stay in `wire`.

mod client;
mod convert;
mod error;
pub mod status;
mod wire;

pub use client::{
    parse_order_list, windows, CancelReason, KaspiClient, KaspiShop, PageRun, Transition,
    TransitionOutcome, MAX_WINDOW, PAGE_SIZE,
};
pub use convert::{almaty, almaty_day_start, content_hash, KaspiOrder};
pub use error::KaspiError;
