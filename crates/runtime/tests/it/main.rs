//! Tests of the runtime against the real models and data sets.
//!
//! The assets come from `scripts/fetch-assets`; the tests look for them in
//! `$STRATA_ASSETS` (default `$HOME/.cache/strata/assets`) and fail, with a
//! message saying how to get them, when they are missing.

mod anomaly;
mod assets;
mod catalogue;
mod embedding;
mod intents;
mod llm;
