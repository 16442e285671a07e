//! Where the test assets are, and the models shared between tests.

use std::path::PathBuf;
use std::sync::OnceLock;

use runtime::{Embedder, EmbeddingConfig, EmbeddingFiles, LlmConfig, LlmModel};

/// The asset directory: `$STRATA_ASSETS`, or `$HOME/.cache/strata/assets`.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_ASSETS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set and STRATA_ASSETS is not set");
    PathBuf::from(home).join(".cache/strata/assets")
}

/// The path of an asset, which must exist.
pub fn path(relative: &str) -> PathBuf {
    let p = dir().join(relative);
    assert!(
        p.exists(),
        "test asset {} is missing: run scripts/fetch-assets (it honours STRATA_ASSETS) before the tests",
        p.display()
    );
    p
}

pub const SMOLLM2: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const MINILM: &str = "all-minilm-l6-v2";
pub const INTENTS: &str = "home-assistant-intents/en.json";
pub const SHUTTLE: &str = "river/shuttle.csv.gz";

/// SmolLM2, loaded once for all tests, with two slots so that concurrent
/// tests exercise the worker pool.
pub fn smollm2() -> &'static LlmModel {
    static MODEL: OnceLock<LlmModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let config = LlmConfig {
            slots: 2,
            ..LlmConfig::default()
        };
        LlmModel::load("smollm2", &path(SMOLLM2), &config).expect("SmolLM2 loads")
    })
}

/// all-MiniLM-L6-v2, loaded once for all tests.
pub fn minilm() -> &'static Embedder {
    static MODEL: OnceLock<Embedder> = OnceLock::new();
    MODEL.get_or_init(|| {
        Embedder::load(
            "minilm",
            &EmbeddingFiles::in_dir(&path(MINILM)),
            &EmbeddingConfig::default(),
        )
        .expect("MiniLM loads")
    })
}
