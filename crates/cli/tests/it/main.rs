//! End-to-end tests of the `strata` binary: real hub and agent processes on
//! loopback, real TLS, real SQLite, in temporary directories.

mod api_errors;
mod demo;
mod enrolment;
mod federated;
mod identity;
mod inference;
mod insights;
mod model_registry;
mod resilience;
mod rollouts;
mod route;
mod support;
