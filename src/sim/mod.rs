//! In-process simulators of the external APIs (Kaspi, Avito, amoCRM), written
//! from the API facts in `shared/apis/*.md` and independently of the
//! connectors: they share no wire types or parsing code with the clients.
//! Used by tests, benchmarks and the demo; nothing else imports this module.
pub mod amocrm;
pub mod avito;
pub mod kaspi;
pub mod partner;

pub(crate) mod support;
