//! Domain types shared by the connectors, the store and the sync: they know
//! nothing of any API's wire format and import nothing of the crate.

pub mod contact;
pub mod order;

pub use contact::{mask_phone, Email, Phone, PhoneError};
pub use order::{Customer, Delivery, Marketplace, Money, Order, OrderItem, StatusKey};
