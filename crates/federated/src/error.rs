//! The crate's one error type.

/// What went wrong in a federated computation. Messages name the thing that
/// was wrong and never contain update values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A vector had the wrong number of values.
    #[error("{what} has {got} values, expected {expected}")]
    Shape {
        /// What the vector is ("update", "global model", …).
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A parameter or input is out of its allowed range.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The parameter or input.
        what: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// Fewer participants or values than a computation needs.
    #[error("too few {what}: need {need}, have {have}")]
    TooFew {
        /// What there are too few of ("updates", "shares", …).
        what: &'static str,
        /// How many are needed.
        need: usize,
        /// How many there are.
        have: usize,
    },
    /// A secure-aggregation message failed a check (decryption,
    /// authentication, consistency).
    #[error("secure aggregation: {0}")]
    SecAgg(String),
    /// Running the next round would spend more privacy than the task allows.
    #[error(
        "privacy budget exceeded: the next round would reach ε = {epsilon:.3} at δ = {delta:e}, the budget is ε = {budget:.3}"
    )]
    BudgetExceeded {
        /// ε after the round.
        epsilon: f64,
        /// The δ ε is reported at.
        delta: f64,
        /// The task's ε budget.
        budget: f64,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
