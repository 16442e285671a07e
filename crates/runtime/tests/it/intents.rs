//! Intent classification on the Home Assistant intents.

use runtime::TextClassifier;
use runtime::classifier::{EmbeddingClassifier, TrainConfig};
use runtime::intents::{self, ExpansionOptions};

use crate::assets;

#[test]
fn intent_classifier_generalises_to_held_out_sentences() {
    let data = intents::load(&assets::path(assets::INTENTS), &ExpansionOptions::default())
        .expect("expands");
    assert_eq!(data.intents.len(), 42);
    let embedder = assets::minilm();
    let eval =
        intents::train_and_evaluate(embedder, &data, 0.2, &TrainConfig::default()).expect("trains");
    eprintln!(
        "intents: {} train, {} held out, train accuracy {:.3}, held-out accuracy {:.3}",
        eval.n_train, eval.n_held_out, eval.train_accuracy, eval.held_out_accuracy
    );
    assert!(eval.n_held_out > 200);
    assert!(
        eval.held_out_accuracy > 0.85,
        "held-out accuracy {}",
        eval.held_out_accuracy
    );

    // Saved and loaded by path, it classifies text through the embedder.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("intents.safetensors");
    eval.head.save(&path).expect("saves");
    let shared = std::sync::Arc::new(
        runtime::Embedder::load(
            "minilm",
            &runtime::EmbeddingFiles::in_dir(&assets::path(assets::MINILM)),
            &runtime::EmbeddingConfig::default(),
        )
        .expect("loads"),
    );
    let classifier = EmbeddingClassifier::load("intents", &path, shared).expect("loads");
    let out = classifier
        .classify(&[
            "turn on the lights in the kitchen",
            "what is the weather like",
        ])
        .expect("classifies");
    assert_eq!(out[0].label, "HassTurnOn");
    assert_eq!(out[1].label, "HassGetWeather");
}
