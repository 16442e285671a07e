//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime.
///
/// Messages are lower-case, without a trailing period, and name the thing
/// that was wrong (the file, the model, the field, the limit).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the GGUF magic bytes.
    #[error("{path} is not a gguf file (magic bytes are {magic:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The offending file.
        path: PathBuf,
        /// The first bytes found in the file (up to four).
        magic: Vec<u8>,
    },

    /// The GGUF file ends before its header or tensor data does.
    #[error(
        "{path} is truncated: the gguf {section} needs {needed_bytes} bytes but the file has {file_bytes}"
    )]
    TruncatedGguf {
        /// The offending file.
        path: PathBuf,
        /// Which part of the file is cut short ("header", "tensor data").
        section: &'static str,
        /// How many bytes the file would need to hold that part.
        needed_bytes: u64,
        /// How many bytes the file has.
        file_bytes: u64,
    },

    /// The GGUF header is malformed in some other way.
    #[error("{path} has an invalid gguf header: {reason}")]
    InvalidGguf {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with the header.
        reason: String,
    },

    /// llama.cpp refused to load a model or to create a context for it.
    #[error("llama.cpp cannot load {path}: {reason}")]
    LlamaLoad {
        /// The model file.
        path: PathBuf,
        /// What llama.cpp reported.
        reason: String,
    },

    /// Strata's native LLM engine cannot run a model it was asked to run.
    #[error("the native engine cannot load {path}: {reason}")]
    NativeLoad {
        /// The model file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },

    /// The prompt does not fit in the model's context window.
    #[error(
        "prompt has {prompt_tokens} tokens but the context holds {context_length} (at least one must be left to generate)"
    )]
    PromptTooLong {
        /// Number of tokens in the prompt.
        prompt_tokens: usize,
        /// The context length of the model instance.
        context_length: usize,
    },

    /// The prompt is empty (no tokens after tokenisation).
    #[error("prompt is empty")]
    EmptyPrompt,

    /// A token id in a pre-tokenised prompt is outside the vocabulary.
    #[error("prompt token {token} is outside the vocabulary of {vocab_size} tokens")]
    InvalidToken {
        /// The offending token id.
        token: u32,
        /// The size of the model's vocabulary.
        vocab_size: usize,
    },

    /// The model has no chat template, or the template could not be applied.
    #[error("chat template of model {model}: {reason}")]
    ChatTemplate {
        /// The model's id.
        model: String,
        /// What went wrong.
        reason: String,
    },

    /// A generation parameter is out of range.
    #[error("generation parameter {name} = {value} is out of range ({expected})")]
    InvalidParameter {
        /// The parameter's name (`temperature`, `top_p`, ...).
        name: &'static str,
        /// The value given, as text.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },

    /// llama.cpp failed while evaluating a batch.
    #[error("llama.cpp decode failed in model {model}: {reason}")]
    Decode {
        /// The model's id.
        model: String,
        /// What llama.cpp reported.
        reason: String,
    },

    /// The generation workers of a model have stopped (a bug, or the process is shutting down).
    #[error("generation workers of model {model} have stopped")]
    WorkersStopped {
        /// The model's id.
        model: String,
    },

    /// A tokenizer file could not be loaded or used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A tensor computation (candle) failed.
    #[error("{context}: {source}")]
    Tensor {
        /// What was being computed or loaded.
        context: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },

    /// A JSON file could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Json {
        /// The offending file.
        path: PathBuf,
        /// The underlying parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A safetensors file is malformed or lacks what the runtime needs.
    #[error("safetensors file {path}: {reason}")]
    Safetensors {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An input vector has the wrong number of features.
    #[error("{what} expects {expected} features but got {got}")]
    FeatureCount {
        /// The model or component that expected the features.
        what: String,
        /// How many features it expects.
        expected: usize,
        /// How many it got.
        got: usize,
    },

    /// An input is unusable for a reason not covered above (empty batch, NaN, ...).
    #[error("invalid input to {what}: {reason}")]
    InvalidInput {
        /// The model or component that rejected the input.
        what: String,
        /// Why.
        reason: String,
    },

    /// A sentence template (hassil syntax) could not be parsed.
    #[error("template {template:?}: {reason}")]
    Template {
        /// The template text.
        template: String,
        /// What is wrong at which position.
        reason: String,
    },

    /// A data set file is malformed.
    #[error("data set {path} line {line}: {reason}")]
    Dataset {
        /// The offending file.
        path: PathBuf,
        /// The 1-based line number (0 when the problem is not tied to a line).
        line: usize,
        /// What is wrong.
        reason: String,
    },

    /// A model catalogue entry is invalid.
    #[error("model catalogue entry {id:?}: {reason}")]
    Catalogue {
        /// The entry's id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Training could not run (too little data, one class only, ...).
    #[error("training {what}: {reason}")]
    Training {
        /// What was being trained.
        what: String,
        /// Why it could not be trained.
        reason: String,
    },
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a candle error with a description of what was being done.
    pub(crate) fn tensor(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Error {
        let context = context.into();
        move |source| Error::Tensor { context, source }
    }

    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
