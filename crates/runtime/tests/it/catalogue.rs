//! Loading a catalogue of real models, with one broken entry.

use runtime::catalogue::{self, RawCatalogue};
use runtime::{ModelKind, SamplingParams};

use crate::assets;

#[test]
fn catalogue_loads_what_it_can() {
    let json = format!(
        r#"{{"models": [
            {{"id": "smollm2", "kind": "llm", "path": "{smollm2}", "context_length": 512}},
            {{"id": "minilm", "kind": "embedding", "path": "{minilm}"}},
            {{"id": "broken", "kind": "llm", "path": "{minilm}/tokenizer.json"}},
            {{"id": "sensors", "kind": "anomaly", "n_features": 3}}
        ]}}"#,
        smollm2 = assets::SMOLLM2,
        minilm = assets::MINILM,
    );
    let raw: RawCatalogue = serde_json::from_str(&json).expect("parses");
    let cat = raw.validate(&assets::dir()).expect("valid");
    let loaded = catalogue::load(&cat, &Default::default());
    assert_eq!(loaded.models.len(), 3, "{loaded:?}");
    assert_eq!(loaded.failures.len(), 1);
    assert_eq!(loaded.failures[0].0, "broken");
    assert!(loaded.failures[0].1.to_string().contains("not a gguf file"));

    let llm = &loaded.models["smollm2"];
    assert_eq!(llm.kind(), ModelKind::Llm);
    assert_eq!(llm.info().context_length, Some(512));
    let generator = llm.as_generator().expect("generates");
    let request = runtime::GenerationRequest {
        max_tokens: Some(4),
        sampling: SamplingParams::greedy(),
        ..runtime::GenerationRequest::chat(vec![runtime::ChatMessage::user(
            "What is the capital of France?",
        )])
    };
    let out = generator
        .generate(&request, &runtime::CancelToken::new(), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .expect("generates");
    assert_eq!(out.text, "The capital of France");

    let embedder = loaded.models["minilm"].as_embedder().expect("embeds");
    assert_eq!(embedder.dimension(), 384);
    assert!(loaded.models["minilm"].as_generator().is_none());
}
