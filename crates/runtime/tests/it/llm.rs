//! GGUF generation through llama.cpp.

use std::ops::ControlFlow;

use runtime::{
    CancelToken, ChatMessage, Error, FinishReason, GenerationRequest, LlmConfig, LlmEngine,
    LlmModel, Prompt, SamplingParams,
};

use crate::assets;

/// "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
const PROMPT: [u32; 16] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];
/// "The capital of France is Paris."
const ANSWER: [u32; 7] = [504, 3575, 282, 4649, 314, 7042, 30];

fn greedy(prompt: Prompt) -> GenerationRequest {
    GenerationRequest {
        max_tokens: Some(24),
        sampling: SamplingParams::greedy(),
        ..GenerationRequest::new(prompt)
    }
}

fn france() -> Vec<ChatMessage> {
    vec![ChatMessage::user("What is the capital of France?")]
}

#[test]
fn smollm2_greedy_matches_reference_tokens() {
    let model = assets::smollm2();
    let out = model
        .complete(&greedy(Prompt::Tokens(PROMPT.to_vec())))
        .expect("generates");
    let ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, ANSWER, "text {:?}", out.text);
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(out.finish_reason, FinishReason::EndOfGeneration);
    assert_eq!(out.usage.prompt_tokens, 16);
    assert_eq!(out.usage.completion_tokens, 7);
    for t in &out.tokens {
        assert!(t.logprob.is_finite() && t.logprob <= 0.0, "{t:?}");
    }
    assert!(out.timings.prefill_ms > 0.0 && out.timings.decode_ms > 0.0);
    assert!(out.timings.prefill_tokens_per_s > 0.0 && out.timings.decode_tokens_per_s > 0.0);
    eprintln!(
        "smollm2: prefill {:.0} tok/s, decode {:.0} tok/s",
        out.timings.prefill_tokens_per_s, out.timings.decode_tokens_per_s
    );
}

#[test]
fn both_engines_give_the_reference_answer() {
    for engine in [LlmEngine::LlamaCpp, LlmEngine::Native] {
        let config = LlmConfig {
            engine,
            ..LlmConfig::default()
        };
        let model = match LlmModel::load("engine", &assets::path(assets::SMOLLM2), &config) {
            Ok(model) => model,
            Err(e) if engine == LlmEngine::Native && e.to_string().contains("VNNI") => {
                eprintln!("the native engine does not run on this CPU: {e}");
                continue;
            }
            Err(e) => panic!("{engine:?} does not load SmolLM2: {e}"),
        };
        let out = model
            .complete(&greedy(Prompt::Tokens(PROMPT.to_vec())))
            .expect("generates");
        let ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, ANSWER, "{engine:?}: text {:?}", out.text);
        eprintln!(
            "{engine:?}: prefill {:.0} tok/s, decode {:.0} tok/s",
            out.timings.prefill_tokens_per_s, out.timings.decode_tokens_per_s
        );
    }
}

#[test]
fn the_native_engine_names_what_it_cannot_run() {
    // Qwen2.5 (qwen2 architecture, Q4_K matrices) is left to llama.cpp.
    let config = LlmConfig {
        engine: LlmEngine::Native,
        ..LlmConfig::default()
    };
    let err = LlmModel::load("qwen", &assets::path(assets::QWEN), &config)
        .expect_err("the native engine runs llama models only");
    assert!(
        err.to_string().contains("native engine cannot load"),
        "{err}"
    );
}

#[test]
fn smollm2_chat_template_gives_the_reference_prompt_and_answer() {
    let model = assets::smollm2();
    assert!(model.has_chat_template());
    let prompt = Prompt::Chat(france());
    assert_eq!(model.prompt_tokens(&prompt).expect("tokenises"), PROMPT);
    let out = model.complete(&greedy(prompt)).expect("generates");
    assert_eq!(out.text, "The capital of France is Paris.");
}

#[test]
fn streaming_chunks_add_up_and_carry_logprobs() {
    let model = assets::smollm2();
    let request = GenerationRequest {
        top_logprobs: 3,
        ..greedy(Prompt::Chat(france()))
    };
    let mut streamed = String::new();
    let mut chunks = 0;
    let out = model
        .generate(&request, &CancelToken::new(), |chunk| {
            streamed.push_str(&chunk.text);
            chunks += 1;
            ControlFlow::Continue(())
        })
        .expect("generates");
    assert_eq!(streamed, out.text);
    assert!(chunks >= out.tokens.len());
    for t in &out.tokens {
        assert_eq!(t.top_logprobs.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t.top_logprobs[0].token, t.id);
        assert!((t.top_logprobs[0].logprob - t.logprob).abs() < 1e-6);
        assert!(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob);
    }
}

#[test]
fn cancellation_stops_generation() {
    let model = assets::smollm2();
    let request = greedy(Prompt::Chat(france()));
    let mut seen = 0;
    let out = model
        .generate(&request, &CancelToken::new(), |_| {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("generates");
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.tokens.len(), 3);

    let cancelled = CancelToken::new();
    cancelled.cancel();
    let out = model
        .generate(&request, &cancelled, |_| ControlFlow::Continue(()))
        .expect("generates");
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert!(out.tokens.is_empty());
}

#[test]
fn stop_sequences_and_max_tokens() {
    let model = assets::smollm2();
    let request = GenerationRequest {
        stop: vec![" Paris".to_owned()],
        ..greedy(Prompt::Chat(france()))
    };
    let out = model.complete(&request).expect("generates");
    assert_eq!(out.text, "The capital of France is");
    assert_eq!(
        out.finish_reason,
        FinishReason::StopSequence(" Paris".to_owned())
    );

    let request = GenerationRequest {
        max_tokens: Some(2),
        ..greedy(Prompt::Chat(france()))
    };
    let out = model.complete(&request).expect("generates");
    assert_eq!(out.finish_reason, FinishReason::MaxTokens);
    assert_eq!(out.text, "The capital");
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let config = LlmConfig {
        context_length: 20,
        ..LlmConfig::default()
    };
    let model =
        LlmModel::load("small-context", &assets::path(assets::SMOLLM2), &config).expect("loads");
    assert_eq!(model.context_length(), 20);
    let out = model
        .complete(&greedy(Prompt::Tokens(PROMPT.to_vec())))
        .expect("generates");
    // 16 prompt tokens + 4 decoded fill the 20 positions; the 5th token is
    // sampled from the last logits.
    assert_eq!(out.finish_reason, FinishReason::ContextFull);
    assert_eq!(out.tokens.len(), 5);
    assert_eq!(out.text, "The capital of France is");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = assets::smollm2();
    let request = GenerationRequest {
        max_tokens: Some(16),
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: Some(1234),
        },
        ..GenerationRequest::chat(vec![ChatMessage::user("Tell me about cats.")])
    };
    let a = model.complete(&request).expect("generates");
    let b = model.complete(&request).expect("generates");
    assert_eq!(a.text, b.text);
    assert!(!a.text.is_empty());
}

#[test]
fn concurrent_requests_share_the_model() {
    let model = assets::smollm2();
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    model
                        .complete(&greedy(Prompt::Chat(france())))
                        .map(|g| g.text)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("generates"))
            .collect()
    });
    for a in answers {
        assert_eq!(a, "The capital of France is Paris.");
    }
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let model = assets::smollm2();
    let long = "hello ".repeat(3000);
    let err = model.complete(&greedy(Prompt::Text(long))).unwrap_err();
    match &err {
        Error::PromptTooLong {
            prompt_tokens,
            context_length,
        } => {
            assert_eq!(*context_length, 2048);
            assert!(*prompt_tokens > 2048);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("2048"), "{err}");

    let err = model
        .complete(&greedy(Prompt::Tokens(vec![1, 999_999])))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidToken { token: 999_999, .. }),
        "{err}"
    );
    let err = model.complete(&greedy(Prompt::Tokens(vec![]))).unwrap_err();
    assert!(matches!(err, Error::EmptyPrompt), "{err}");
}

#[test]
fn qwen_loads_and_answers_sensibly() {
    let model = LlmModel::load("qwen", &assets::path(assets::QWEN), &LlmConfig::default())
        .expect("Qwen loads");
    assert_eq!(model.info().architecture, "qwen2");
    let request = GenerationRequest {
        max_tokens: Some(40),
        sampling: SamplingParams::greedy(),
        ..GenerationRequest::chat(vec![ChatMessage::user(
            "Write a Python function named add that returns the sum of two numbers.",
        )])
    };
    let out = model.complete(&request).expect("generates");
    eprintln!(
        "qwen: {:?} ({:.0} tok/s decode)",
        out.text, out.timings.decode_tokens_per_s
    );
    assert!(out.text.contains("def add"), "{:?}", out.text);
}

#[test]
fn truncated_and_foreign_files_are_rejected_before_llama_cpp() {
    let dir = tempfile::tempdir().expect("temp dir");
    let original = std::fs::read(assets::path(assets::SMOLLM2)).expect("reads model");

    // Cut inside the tensor data.
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &original[..original.len() / 2]).expect("writes");
    let err = LlmModel::load("t", &truncated, &LlmConfig::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TruncatedGguf {
                section: "tensor data",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    // Cut inside the header (inside the vocabulary array).
    std::fs::write(&truncated, &original[..100_000]).expect("writes");
    let err = LlmModel::load("t", &truncated, &LlmConfig::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TruncatedGguf {
                section: "header",
                ..
            }
        ),
        "{err}"
    );

    // Not a GGUF file at all.
    let foreign = dir.path().join("model.gguf");
    std::fs::write(&foreign, b"{\"this\": \"is json\"}").expect("writes");
    let err = LlmModel::load("f", &foreign, &LlmConfig::default()).unwrap_err();
    assert!(matches!(err, Error::NotGguf { .. }), "{err}");

    let err =
        LlmModel::load("m", &dir.path().join("missing.gguf"), &LlmConfig::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn gguf_headers_of_the_real_models_account_for_every_byte() {
    for asset in [assets::SMOLLM2, assets::QWEN] {
        let summary = runtime::gguf::inspect(&assets::path(asset)).expect("valid gguf");
        // The tensor table describes data that ends exactly at the end of the file.
        assert_eq!(summary.needed_bytes, summary.file_bytes, "{asset}");
        assert!(summary.chat_template().is_some(), "{asset}");
    }
}
