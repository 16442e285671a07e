//! GGUF text generation with llama.cpp.
//!
//! [`LlmModel::load`] checks the file with [`crate::gguf::inspect`], loads the
//! weights once, and starts `slots` worker threads. Each worker owns one
//! llama.cpp context (its KV cache) for its whole life and serves one request
//! at a time; requests wait in a FIFO queue for a free worker. This is the
//! design of llama.cpp's own server: a context is not safe to share between
//! threads, creating one per request costs an allocation of the whole KV
//! cache, and on a small CPU more concurrent decodes only share the same
//! cores. One slot (the default) serves requests strictly one after another.
//!
//! The caller's thread tokenises the prompt, hands the tokens to a worker and
//! then runs the caller's callback for every chunk the worker streams back,
//! so the callback needs to be neither `Send` nor `'static`.
//!
//! Sampling, stop sequences and log-probabilities are done in Rust on the
//! logits llama.cpp returns (see [`SamplingParams`]).

mod native;
mod qkernels;
mod sampling;
mod text;

use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};

pub use sampling::{SamplingParams, TokenLogprob};

use crate::backend::{ModelBackend, ModelInfo, ModelKind, TextGenerator};
use crate::error::{Error, Result};
use crate::gguf;
use sampling::{Sampler, log_sum_exp, top_logprobs};
use text::{StopFilter, Utf8Stream};

/// How an LLM is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmConfig {
    /// CPU threads each generation uses (prompt and decode). Default 2.
    pub threads: u32,
    /// Context length in tokens (prompt plus completion) of each slot.
    /// Capped at the length the model was trained with. Default 2048.
    pub context_length: u32,
    /// Number of requests served at once, each with its own context
    /// (KV cache). Default 1.
    pub slots: u32,
    /// Largest number of prompt tokens evaluated in one batch.
    /// Default 512.
    pub batch_size: u32,
    /// Which engine evaluates the model. Default [`LlmEngine::Auto`].
    pub engine: LlmEngine,
}

/// The engine that evaluates a GGUF model's tokens (tokenisation and chat
/// templates are llama.cpp's whichever runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmEngine {
    /// The native engine when it runs the file (a llama-architecture model
    /// with Q4_1 or Q8_0 matrices, on a CPU with AVX-512 VNNI), else
    /// llama.cpp.
    #[default]
    Auto,
    /// Always llama.cpp.
    #[serde(rename = "llama.cpp", alias = "llama_cpp")]
    LlamaCpp,
    /// Always the native engine; loading fails if it cannot run the file.
    Native,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            threads: 2,
            context_length: 2048,
            slots: 1,
            batch_size: 512,
            engine: LlmEngine::Auto,
        }
    }
}

/// One message of an OpenAI-style chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (passed to the template as given).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the chat template from the GGUF metadata
    /// and followed by the opening of the assistant's turn.
    Chat(Vec<ChatMessage>),
    /// Raw text (a plain completion); special tokens written in the text,
    /// such as `<|im_start|>`, are recognised.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// The most tokens to generate; `None` generates until the model ends
    /// its turn or the context is full.
    pub max_tokens: Option<u32>,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the stop
    /// sequence itself is not part of the returned text.
    pub stop: Vec<String>,
    /// How many of the most likely alternatives to report with each token
    /// (OpenAI's `top_logprobs`, at most 20). The chosen token's own
    /// log-probability is always reported.
    pub top_logprobs: u8,
}

impl GenerationRequest {
    /// A request for a chat completion with default sampling.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    /// A request with default sampling and no limits.
    pub fn new(prompt: Prompt) -> Self {
        GenerationRequest {
            prompt,
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            top_logprobs: 0,
        }
    }
}

/// A generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeneratedToken {
    /// The token id.
    pub id: u32,
    /// The token's bytes. A token can hold part of a UTF-8 character, so
    /// these are bytes, not text.
    pub bytes: Vec<u8>,
    /// Natural log of the token's probability: the log-softmax of the
    /// model's logits (temperature 1, before top-k/top-p filtering).
    pub logprob: f32,
    /// The most likely tokens at this position with their log-probabilities,
    /// most likely first (as many as the request asked for).
    pub top_logprobs: Vec<TokenLogprob>,
}

/// One piece of a streamed generation.
///
/// Concatenating the `text` of every chunk gives [`Generation::text`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamChunk {
    /// Text released by this step: complete UTF-8 characters, and never the
    /// start of a stop sequence (held back until it is known not to be one).
    /// Can be empty.
    pub text: String,
    /// The token this step generated; `None` for the final chunk that
    /// releases held-back text when generation ends.
    pub token: Option<GeneratedToken>,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum FinishReason {
    /// The model produced an end-of-generation token (end of its turn).
    EndOfGeneration,
    /// The text reached one of the request's stop sequences (given here).
    StopSequence(String),
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The request was cancelled (token cancelled or callback returned `Break`).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI `finish_reason` for this reason (`stop` or `length`;
    /// `cancelled` has no OpenAI counterpart).
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::EndOfGeneration | FinishReason::StopSequence(_) => "stop",
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (not counting the end-of-generation token).
    pub completion_tokens: usize,
}

/// Where the time of a generation went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timings {
    /// Time spent waiting for a free slot.
    pub queue_ms: f64,
    /// Time to evaluate the prompt (up to the first token's logits).
    pub prefill_ms: f64,
    /// Time spent generating after the prompt (decoding and sampling).
    pub decode_ms: f64,
    /// Prompt tokens evaluated per second.
    pub prefill_tokens_per_s: f64,
    /// Tokens decoded per second after the prompt.
    pub decode_tokens_per_s: f64,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The generated text (without any stop sequence).
    pub text: String,
    /// Every generated token with its log-probability.
    pub tokens: Vec<GeneratedToken>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// A cancellation flag shared between the requester and the generation.
///
/// Clones share the flag. Generation checks it between tokens (and between
/// prompt batches), so a cancel takes effect within one decode step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps an existing flag.
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        CancelToken(flag)
    }

    /// Asks the generation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The process-wide llama.cpp backend, initialised once with its logging
/// routed to `tracing` (target `llama-cpp-2`), never to stderr.
pub(crate) fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Creates a worker's context and tells the thread that started the worker
/// whether it could; `None` when it could not (the worker then ends).
pub(crate) fn new_context<'a>(
    model: &'a LlamaModel,
    backend: &LlamaBackend,
    params: LlamaContextParams,
    ready: &mpsc::Sender<Result<(), String>>,
) -> Option<LlamaContext<'a>> {
    match model.new_context(backend, params) {
        Ok(ctx) => {
            let _ = ready.send(Ok(()));
            Some(ctx)
        }
        Err(e) => {
            let _ = ready.send(Err(format!("cannot create a context: {e}")));
            None
        }
    }
}

/// A GGUF language model served by a pool of llama.cpp contexts.
///
/// `LlmModel` is `Send + Sync`: share it in an `Arc` and call
/// [`LlmModel::generate`] from any number of threads.
pub struct LlmModel {
    info: ModelInfo,
    model: Arc<LlamaModel>,
    template: Option<LlamaChatTemplate>,
    context_length: usize,
    vocab_size: usize,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for LlmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmModel")
            .field("info", &self.info)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

/// A request on its way to a worker.
struct Job {
    tokens: Vec<LlamaToken>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    top_logprobs: usize,
    cancel: CancelToken,
    events: mpsc::Sender<Event>,
    /// The caller's verdict on each chunk: `true` to go on, `false` to stop.
    acks: mpsc::Receiver<bool>,
    /// Whether the caller wants each chunk as it comes; if not, only the
    /// finished generation is sent.
    stream: bool,
    enqueued: Instant,
}

/// What a worker sends back while it serves a job.
enum Event {
    Chunk(StreamChunk),
    Done(Result<Generation>),
}

impl LlmModel {
    /// Loads the GGUF file at `path` and starts its worker threads.
    ///
    /// The file is checked first ([`Error::NotGguf`], [`Error::TruncatedGguf`],
    /// [`Error::InvalidGguf`]); llama.cpp only sees files that pass.
    pub fn load(id: &str, path: &Path, config: &LlmConfig) -> Result<LlmModel> {
        if config.threads == 0 || config.slots == 0 || config.batch_size == 0 {
            return Err(Error::Catalogue {
                id: id.to_owned(),
                reason: "threads, slots and batch_size must be at least 1".to_owned(),
            });
        }
        let summary = gguf::inspect(path)?;
        let load_err = |reason: String| Error::LlamaLoad {
            path: path.to_path_buf(),
            reason,
        };
        let native = match (config.engine, native::unsupported(&summary)) {
            (LlmEngine::LlamaCpp, _) | (LlmEngine::Auto, Some(_)) => None,
            (_, None) => Some(Arc::new(native::NativeModel::load(path, &summary)?)),
            (LlmEngine::Native, Some(why)) => {
                return Err(Error::NativeLoad {
                    path: path.to_path_buf(),
                    reason: format!("it does not run {why}"),
                });
            }
        };
        let backend = backend().map_err(load_err)?;
        // With the native engine, llama.cpp only tokenises: it reads the
        // vocabulary and none of the weights.
        let params = LlamaModelParams::default().with_vocab_only(native.is_some());
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| load_err(e.to_string()))?;
        let model = Arc::new(model);

        // A vocabulary-only load does not read the training context length.
        let trained = match &native {
            Some(_) => summary
                .context_length()
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(u32::MAX),
            None => model.n_ctx_train(),
        }
        .max(1);
        let context_length = config.context_length.clamp(1, trained);
        let batch_size = config.batch_size.min(context_length);
        let template = model.chat_template(None).ok();
        let vocab_size = usize::try_from(model.n_vocab()).unwrap_or(0);

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let threads = i32::try_from(config.threads).unwrap_or(i32::MAX);
        for slot in 0..config.slots {
            let worker = Worker {
                model_id: id.to_owned(),
                model: Arc::clone(&model),
                native: native.clone(),
                jobs: Arc::clone(&jobs_rx),
                batch_size: batch_size as usize,
                context_length: context_length as usize,
            };
            // Contexts are created one at a time: llama.cpp's context
            // constructor writes to the model, so creating two at once from
            // the same model is not sound.
            let (ready_tx, ready_rx) = mpsc::channel();
            thread::Builder::new()
                .name(format!("llm-{id}-{slot}"))
                .spawn(move || worker.run(backend, context_length, threads, ready_tx))
                .map_err(|e| load_err(format!("cannot start worker thread: {e}")))?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(load_err(reason)),
                Err(_) => return Err(load_err("worker thread stopped while starting".into())),
            }
        }

        let info = ModelInfo {
            id: id.to_owned(),
            kind: ModelKind::Llm,
            path: Some(path.to_path_buf()),
            name: summary.name().map(str::to_owned),
            architecture: summary.architecture().unwrap_or("unknown").to_owned(),
            parameter_count: Some(summary.parameter_count),
            size_bytes: Some(summary.file_bytes),
            context_length: Some(context_length as usize),
            output_dim: Some(vocab_size),
        };
        let engine = if native.is_some() {
            "native"
        } else {
            "llama.cpp"
        };
        let packed_bytes = native.as_ref().map_or(0, |n| n.bytes());
        tracing::info!(model = id, path = %path.display(), context_length, slots = config.slots, engine, packed_bytes, "loaded llm");
        Ok(LlmModel {
            info,
            model,
            template,
            context_length: context_length as usize,
            vocab_size,
            jobs: jobs_tx,
        })
    }

    /// What the runtime knows about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The context length (prompt plus completion) of each slot, in tokens.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Whether the GGUF file carries a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders chat messages with the model's chat template, ending with the
    /// opening of the assistant's turn.
    ///
    /// The template is the one in the GGUF metadata
    /// (`tokenizer.chat_template`), interpreted by llama.cpp's built-in
    /// template engine, which recognises the common template families
    /// (ChatML, Llama 2/3, Mistral, Gemma, Phi, ...) rather than running
    /// arbitrary Jinja: so a template's default system prompt, if it has one,
    /// is not inserted.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let err = |reason: String| Error::ChatTemplate {
            model: self.info.id.clone(),
            reason,
        };
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| err("the gguf file has no tokenizer.chat_template".into()))?;
        if messages.is_empty() {
            return Err(err("there are no messages".into()));
        }
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(format!("message cannot be passed to llama.cpp: {e}")))?;
        self.model
            .apply_chat_template(template, &chat, true)
            .map_err(|e| err(format!("llama.cpp cannot apply it: {e}")))
    }

    /// Tokenises text; special tokens written in it are recognised, and a
    /// beginning-of-sequence token is added if the model asks for one.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let vocab = self.model.vocab();
        let bos = vocab.bos();
        let mut tokens = vocab.tokenize(text.as_bytes(), true, true);
        // A template that writes the BOS token itself must not get a second one.
        if tokens.len() >= 2 && tokens[0] == bos && tokens[1] == bos {
            tokens.remove(0);
        }
        tokens.into_iter().map(|t| t.0 as u32).collect()
    }

    /// The bytes of a token (special tokens render as nothing).
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        if token as usize >= self.vocab_size {
            return Vec::new();
        }
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token as i32), false, None)
    }

    /// The prompt's tokens, as generation would see them.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let tokens = match prompt {
            Prompt::Chat(messages) => self.tokenize(&self.apply_chat_template(messages)?),
            Prompt::Text(text) => self.tokenize(text),
            Prompt::Tokens(tokens) => tokens.clone(),
        };
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::InvalidToken {
                token: bad,
                vocab_size: self.vocab_size,
            });
        }
        if tokens.len() >= self.context_length {
            return Err(Error::PromptTooLong {
                prompt_tokens: tokens.len(),
                context_length: self.context_length,
            });
        }
        Ok(tokens)
    }

    /// Generates a completion, streaming chunks to `on_chunk`.
    ///
    /// Blocks until generation ends (run it on a blocking thread in async
    /// code). `on_chunk` runs on the calling thread, and the next token is
    /// generated only after it returns. Generation stops early when `on_chunk`
    /// returns `ControlFlow::Break` (no further token is generated) or when
    /// `cancel` is cancelled from another thread (checked before each token
    /// and between prompt batches); the result then has
    /// [`FinishReason::Cancelled`] and what was generated so far.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        on_chunk: impl FnMut(&StreamChunk) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.run(request, cancel, true, on_chunk)
    }

    fn run(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        stream: bool,
        mut on_chunk: impl FnMut(&StreamChunk) -> ControlFlow<()>,
    ) -> Result<Generation> {
        request.sampling.validate()?;
        if request.top_logprobs > 20 {
            return Err(Error::InvalidParameter {
                name: "top_logprobs",
                value: request.top_logprobs.to_string(),
                expected: "0 to 20",
            });
        }
        if request.max_tokens == Some(0) {
            return Err(Error::InvalidParameter {
                name: "max_tokens",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        let tokens = self.prompt_tokens(&request.prompt)?;
        let (events_tx, events_rx) = mpsc::channel();
        let (acks_tx, acks_rx) = mpsc::channel();
        let job = Job {
            tokens: tokens.iter().map(|&t| LlamaToken(t as i32)).collect(),
            max_tokens: request.max_tokens.map_or(usize::MAX, |m| m as usize),
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            top_logprobs: usize::from(request.top_logprobs),
            cancel: cancel.clone(),
            events: events_tx,
            acks: acks_rx,
            stream,
            enqueued: Instant::now(),
        };
        let stopped = || Error::WorkersStopped {
            model: self.info.id.clone(),
        };
        self.jobs.send(job).map_err(|_| stopped())?;
        loop {
            match events_rx.recv() {
                Ok(Event::Chunk(chunk)) => {
                    // The worker waits for this verdict before the next
                    // token, so a `Break` stops generation exactly here.
                    let go_on = on_chunk(&chunk).is_continue();
                    let _ = acks_tx.send(go_on);
                }
                Ok(Event::Done(result)) => return result,
                Err(_) => return Err(stopped()),
            }
        }
    }

    /// Generates a completion without streaming.
    /// Chunks are not sent to this thread one by one: the worker hands over
    /// the finished generation only, and wakes no other thread per token.
    pub fn complete(&self, request: &GenerationRequest) -> Result<Generation> {
        self.run(request, &CancelToken::new(), false, |_| {
            ControlFlow::Continue(())
        })
    }
}

impl TextGenerator for LlmModel {
    fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        on_chunk: &mut dyn FnMut(&StreamChunk) -> ControlFlow<()>,
    ) -> Result<Generation> {
        LlmModel::generate(self, request, cancel, on_chunk)
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn count_tokens(&self, prompt: &Prompt) -> Result<usize> {
        Ok(match prompt {
            Prompt::Chat(messages) => self.tokenize(&self.apply_chat_template(messages)?).len(),
            Prompt::Text(text) => self.tokenize(text).len(),
            Prompt::Tokens(tokens) => tokens.len(),
        })
    }

    fn token_bytes(&self, token: u32) -> Vec<u8> {
        LlmModel::token_bytes(self, token)
    }
}

impl ModelBackend for LlmModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn as_generator(&self) -> Option<&dyn TextGenerator> {
        Some(self)
    }
}

/// One slot: a thread that owns a context and serves jobs from the queue.
struct Worker {
    model_id: String,
    model: Arc<LlamaModel>,
    /// The packed weights, when the native engine runs the model.
    native: Option<Arc<native::NativeModel>>,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    batch_size: usize,
    context_length: usize,
}

impl Worker {
    fn run(
        self,
        backend: &LlamaBackend,
        context_length: u32,
        threads: i32,
        ready: mpsc::Sender<Result<(), String>>,
    ) {
        let mut engine = match &self.native {
            Some(native) => {
                match native::Session::new(
                    Arc::clone(native),
                    threads.max(1) as usize,
                    self.context_length,
                ) {
                    Ok(session) => {
                        let _ = ready.send(Ok(()));
                        Engine::Native(Box::new(session))
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("cannot start threads: {e}")));
                        return;
                    }
                }
            }
            None => {
                let batch_size = u32::try_from(self.batch_size).unwrap_or(u32::MAX);
                let params = LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new(context_length))
                    .with_n_batch(batch_size)
                    .with_n_ubatch(batch_size)
                    .with_n_seq_max(1)
                    .with_n_threads(threads)
                    .with_n_threads_batch(threads);
                let Some(ctx) = new_context(&self.model, backend, params, &ready) else {
                    return;
                };
                Engine::Llama {
                    ctx,
                    batch: LlamaBatch::new(self.batch_size, 1),
                    logits_index: 0,
                }
            }
        };
        loop {
            // The lock is held only while waiting for the next job; a
            // poisoned lock (a panic elsewhere) still holds a usable receiver.
            let job = {
                let rx = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
                rx.recv()
            };
            let Ok(job) = job else {
                // The model was dropped: no more jobs will come.
                return;
            };
            let result = self.serve(&mut engine, &job);
            let _ = job.events.send(Event::Done(result));
        }
    }

    fn decode_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Decode {
            model: self.model_id.clone(),
            reason: e.to_string(),
        }
    }

    fn serve(&self, engine: &mut Engine<'_>, job: &Job) -> Result<Generation> {
        let started = Instant::now();
        let queue_ms = ms(started - job.enqueued);
        let n_prompt = job.tokens.len();
        // llama.cpp may round the context up; the limit callers were told
        // (and prompts were checked against) is the configured one.
        let n_ctx = engine.n_ctx().min(self.context_length);
        let mut out = Output {
            stream: job.stream,
            events: &job.events,
            acks: &job.acks,
            text: String::new(),
            tokens: Vec::new(),
            stop: false,
        };
        let finish = |out: Output<'_>,
                      reason: FinishReason,
                      prefill_ms: f64,
                      decode_ms: f64,
                      steps: usize| {
            Generation {
                text: out.text,
                usage: Usage {
                    prompt_tokens: n_prompt,
                    completion_tokens: out.tokens.len(),
                },
                tokens: out.tokens,
                finish_reason: reason,
                timings: Timings {
                    queue_ms,
                    prefill_ms,
                    decode_ms,
                    prefill_tokens_per_s: per_s(n_prompt, prefill_ms),
                    decode_tokens_per_s: per_s(steps, decode_ms),
                },
            }
        };
        if job.cancel.is_cancelled() {
            return Ok(finish(out, FinishReason::Cancelled, 0.0, 0.0, 0));
        }

        // Prefill, in batches of at most `batch_size` tokens; only the last
        // prompt token needs logits.
        engine.reset().map_err(|e| self.decode_err(e))?;
        for (c, chunk) in job.tokens.chunks(self.batch_size).enumerate() {
            engine
                .eval(chunk, c * self.batch_size)
                .map_err(|e| self.decode_err(e))?;
            if job.cancel.is_cancelled() {
                let prefill_ms = ms(started.elapsed());
                return Ok(finish(out, FinishReason::Cancelled, prefill_ms, 0.0, 0));
            }
        }
        let prefill_done = Instant::now();
        let prefill_ms = ms(prefill_done - started);

        let mut sampler = Sampler::new(job.sampling.clone());
        let mut utf8 = Utf8Stream::default();
        let mut stops = StopFilter::new(&job.stop);
        let mut pos = n_prompt;
        let mut steps = 0usize;
        let reason = loop {
            let logits = engine.logits();
            let id = sampler.sample(logits);
            let lse = log_sum_exp(logits);
            let logprob = logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |l| l - lse);
            let top = top_logprobs(logits, lse, job.top_logprobs);
            let token = LlamaToken(id as i32);

            let vocab = self.model.vocab();
            if vocab.is_eog(token) {
                break FinishReason::EndOfGeneration;
            }
            let bytes = vocab.token_to_piece(token, false, None);
            let released = stops.push(&utf8.push(&bytes));
            let generated = GeneratedToken {
                id,
                bytes,
                logprob,
                top_logprobs: top,
            };
            out.emit(released.text, Some(generated));
            if let Some(i) = released.stop {
                break FinishReason::StopSequence(
                    job.stop
                        .iter()
                        .filter(|s| !s.is_empty())
                        .nth(i)
                        .cloned()
                        .unwrap_or_default(),
                );
            }
            if job.cancel.is_cancelled() || out.stop {
                break FinishReason::Cancelled;
            }
            if out.tokens.len() >= job.max_tokens {
                break FinishReason::MaxTokens;
            }
            if pos >= n_ctx {
                break FinishReason::ContextFull;
            }
            engine.eval(&[token], pos).map_err(|e| self.decode_err(e))?;
            pos += 1;
            steps += 1;
        };
        if !matches!(reason, FinishReason::StopSequence(_)) {
            let mut tail = stops.push(&utf8.finish()).text;
            tail.push_str(&stops.finish());
            if !tail.is_empty() {
                out.emit(tail, None);
            }
        }
        let decode_ms = ms(prefill_done.elapsed());
        Ok(finish(out, reason, prefill_ms, decode_ms, steps))
    }
}

/// What evaluates a worker's tokens.
enum Engine<'m> {
    Llama {
        ctx: LlamaContext<'m>,
        batch: LlamaBatch<'m>,
        /// Index in the last batch of the token whose logits are wanted.
        logits_index: i32,
    },
    Native(Box<native::Session>),
}

impl Engine<'_> {
    /// Forgets the previous request's tokens.
    fn reset(&mut self) -> std::result::Result<(), String> {
        match self {
            // Only the cache's bookkeeping is reset: clearing its data too
            // would write the whole cache (45 MiB for SmolLM2 at 2048
            // tokens) before every prompt, and cells that hold no token
            // are masked out anyway.
            Engine::Llama { ctx, .. } => ctx
                .clear_kv_cache_seq(None, None, None)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Engine::Native(s) => {
                s.reset();
                Ok(())
            }
        }
    }

    /// The positions a request can use.
    fn n_ctx(&self) -> usize {
        match self {
            Engine::Llama { ctx, .. } => ctx.n_ctx() as usize,
            Engine::Native(_) => usize::MAX,
        }
    }

    /// Evaluates `tokens` at positions `pos..`, keeping the logits of the
    /// last one.
    fn eval(&mut self, tokens: &[LlamaToken], pos: usize) -> std::result::Result<(), String> {
        match self {
            Engine::Llama {
                ctx,
                batch,
                logits_index,
            } => {
                batch.clear();
                for (j, &token) in tokens.iter().enumerate() {
                    batch
                        .add(token, (pos + j) as i32, &[0], j + 1 == tokens.len())
                        .map_err(|e| e.to_string())?;
                }
                ctx.decode(batch).map_err(|e| e.to_string())?;
                *logits_index = batch.n_tokens() - 1;
                Ok(())
            }
            Engine::Native(s) => {
                debug_assert_eq!(s.past(), pos, "positions are evaluated in order");
                let ids: Vec<u32> = tokens.iter().map(|t| t.0 as u32).collect();
                s.eval(&ids)
            }
        }
    }

    /// The logits of the last token evaluated.
    fn logits(&self) -> &[f32] {
        match self {
            Engine::Llama {
                ctx, logits_index, ..
            } => ctx.get_logits_ith(*logits_index),
            Engine::Native(s) => s.logits(),
        }
    }
}

/// The generation so far, and the channel its chunks go out on.
struct Output<'a> {
    /// Send each chunk (else only keep it for the finished generation).
    stream: bool,
    events: &'a mpsc::Sender<Event>,
    acks: &'a mpsc::Receiver<bool>,
    text: String,
    tokens: Vec<GeneratedToken>,
    /// The caller's callback asked to stop, or the caller went away.
    stop: bool,
}

impl Output<'_> {
    /// Hands a chunk to the caller and waits for the callback's verdict
    /// (when streaming): a slow consumer slows generation down
    /// (backpressure) instead of piling chunks up, a `Break` takes effect
    /// before another token is generated, and on a two-core device the
    /// consumer runs while the decoding threads wait rather than
    /// preempting them mid-token.
    fn emit(&mut self, text: String, token: Option<GeneratedToken>) {
        self.text.push_str(&text);
        if !self.stream {
            self.tokens.extend(token);
            return;
        }
        if let Some(t) = &token {
            self.tokens.push(t.clone());
        }
        let delivered = self
            .events
            .send(Event::Chunk(StreamChunk { text, token }))
            .is_ok();
        if !delivered || self.acks.recv() != Ok(true) {
            self.stop = true;
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per_s(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 / (ms / 1000.0)
    } else {
        0.0
    }
}
