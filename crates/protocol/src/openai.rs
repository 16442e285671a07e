//! OpenAI-compatible wire types: what the agent's local API (and later the
//! hub's macro tier) accepts and returns on `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings` and `/v1/models`, plus Strata's own
//! `/v1/classify` and `/v1/anomaly`.
//!
//! Requests accept the fields the OpenAI API defines; a field that is not
//! part of it is refused (400) rather than silently ignored. Fields Strata
//! cannot honour (several choices, tools) are refused by the server with a
//! message naming them.

use serde::{Deserialize, Serialize};

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong, for a person.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, e.g. `model_not_found`, `context_length_exceeded`.
    pub code: Option<String>,
}

/// A string or a list of strings (`stop`, `input`, `prompt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Message content: plain text or a list of text parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type": "text", "text": ...}` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// Part type; Strata serves `text`.
    #[serde(rename = "type")]
    pub part_type: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat message in a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The content.
    pub content: MessageContent,
    /// An optional participant name (accepted, not used).
    #[serde(default)]
    pub name: Option<String>,
}

/// Streaming options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// Model id from `/v1/models`.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2 (0 is greedy). Default 1.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, (0, 1]. Default 1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (a common extension; 0 keeps all).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Stream the answer as Server-Sent Events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Return the log-probability of each generated token.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Also return this many most likely alternatives per token (0 to 20).
    #[serde(default)]
    pub top_logprobs: Option<u8>,
    /// Number of choices; only 1 is served.
    #[serde(default)]
    pub n: Option<u32>,
    /// Accepted for compatibility; must be 0 or absent.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Accepted for compatibility; must be 0 or absent.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Tool (function) definitions. Local micro models take none; the
    /// router sends such requests to a tier that does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    /// How the model should use the tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<serde_json::Value>,
    /// An end-user id (accepted, not used).
    #[serde(default)]
    pub user: Option<String>,
    /// Strata's routing options (mode, private, app, latency budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strata: Option<crate::route::RouteOptions>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// Model id from `/v1/models`.
    pub model: String,
    /// The prompt (one string; a list must hold exactly one).
    pub prompt: OneOrMany,
    /// Most tokens to generate. Default 16, as in OpenAI's API.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (extension).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Stream the answer.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Return this many alternatives' log-probabilities per token (0 to 5).
    #[serde(default)]
    pub logprobs: Option<u8>,
    /// Number of choices; only 1 is served.
    #[serde(default)]
    pub n: Option<u32>,
    /// An end-user id (accepted, not used).
    #[serde(default)]
    pub user: Option<String>,
    /// Strata's routing options (mode, private, app, latency budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strata: Option<crate::route::RouteOptions>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// One token's log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Natural-log probability.
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives at this position.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural-log probability.
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// Log-probabilities of a choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
}

/// How long each phase took and how fast it ran: Strata's addition to a
/// response, under the `strata` key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StrataTimings {
    /// Time spent waiting for a free slot.
    pub queue_ms: f64,
    /// Time to evaluate the prompt.
    pub prefill_ms: f64,
    /// Time to generate.
    pub decode_ms: f64,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second.
    pub decode_tokens_per_s: f64,
    /// Mean log-probability of the generated tokens: the answer's confidence.
    pub mean_logprob: Option<f32>,
    /// The router's decision record, when the answer went through the
    /// edge agent's router.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub route: Option<crate::route::RouteRecord>,
}

/// An assistant message in a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop`, `length` or `cancelled`.
    pub finish_reason: String,
    /// Token log-probabilities, when asked for.
    pub logprobs: Option<ChoiceLogprobs>,
}

/// A chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model that answered.
    pub model: String,
    /// The answer.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// Timings, confidence and the decision record.
    #[serde(default)]
    pub strata: StrataTimings,
}

/// The changing part of a streamed chat chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant` on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A choice inside a streamed chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// New text.
    pub delta: ChatDelta,
    /// Set on the last chunk.
    pub finish_reason: Option<String>,
    /// The new tokens' log-probabilities, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChoiceLogprobs>,
}

/// One streamed chat chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same for every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model.
    pub model: String,
    /// Zero or one choice (none in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the last chunk, when `stream_options.include_usage` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The decision record, in a last chunk of its own (no choices) when
    /// the stream went through the edge agent's router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strata: Option<crate::route::RouteRecord>,
}

/// Legacy completion log-probabilities.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Alternatives per position.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Character offsets of each token in the text.
    pub text_offset: Vec<usize>,
}

/// A choice of a text completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The generated text.
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length` or `cancelled`; `null` in intermediate stream chunks.
    pub finish_reason: Option<String>,
}

/// A text completion (`text_completion`), whole or one streamed chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model.
    pub model: String,
    /// The answer.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (whole responses and the usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Timings (whole responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strata: Option<StrataTimings>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// Model id.
    pub model: String,
    /// One text or several.
    pub input: OneOrMany,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Must equal the model's dimension if given.
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// An end-user id (accepted, not used).
    #[serde(default)]
    pub user: Option<String>,
    /// Strata's routing options (mode, private, app, latency budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strata: Option<crate::route::RouteOptions>,
}

/// An embedding vector, as floats or base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// Floats.
    Float(Vec<f32>),
    /// Base64 of little-endian f32.
    Base64(String),
}

/// One embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// `embedding`.
    pub object: String,
    /// Position in the input.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingVector,
}

/// Token counts of an embedding response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Tokens in the input.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
}

/// An embeddings response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: String,
    /// One per input.
    pub data: Vec<Embedding>,
    /// The model.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
    /// The decision record, when the request went through the edge
    /// agent's router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strata: Option<crate::route::RouteRecord>,
}

/// A model in `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// The id to put in requests.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds the model was loaded.
    pub created: i64,
    /// `strata`.
    pub owned_by: String,
    /// `llm`, `embedding`, `classifier` or `anomaly`.
    pub kind: String,
}

/// `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models.
    pub data: Vec<Model>,
}

/// `POST /v1/classify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// A classifier model id.
    pub model: String,
    /// One text or several.
    pub input: OneOrMany,
}

/// One classification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// Position in the input.
    pub index: usize,
    /// The most probable label.
    pub label: String,
    /// Its probability.
    pub confidence: f32,
    /// Probability minus the runner-up's: the router's confidence margin.
    pub margin: f32,
    /// Every label's probability.
    pub probabilities: std::collections::BTreeMap<String, f32>,
}

/// `/v1/classify` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyResponse {
    /// The model.
    pub model: String,
    /// One per input.
    pub data: Vec<Classification>,
}

/// `POST /v1/anomaly`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyRequest {
    /// An anomaly model id.
    pub model: String,
    /// Readings in arrival order; each has the model's number of features.
    pub readings: Vec<Vec<f64>>,
}

/// One scored reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyScore {
    /// Position in the request.
    pub index: usize,
    /// Anomaly score in [0, 1]; higher is more anomalous.
    pub score: f64,
}

/// `/v1/anomaly` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyResponse {
    /// The model.
    pub model: String,
    /// One per reading.
    pub data: Vec<AnomalyScore>,
}
