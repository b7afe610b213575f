//! One folder per external API: the client, its private wire types, and the
//! conversion into domain types. Nothing outside a connector's folder sees its
//! wire types.

pub mod amocrm;
pub mod avito;
pub mod kaspi;
