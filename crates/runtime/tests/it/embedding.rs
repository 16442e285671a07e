//! Sentence embeddings with all-MiniLM-L6-v2.

use runtime::embedding::cosine;

use crate::assets;

#[test]
fn minilm_cosine_matches_reference() {
    let model = assets::minilm();
    assert_eq!(model.dimension(), 384);
    let v = model
        .embed(&["The cat sits on the mat", "A feline rests on the rug"])
        .expect("embeds");
    for e in &v {
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    let c = cosine(&v[0], &v[1]);
    eprintln!("minilm cosine: {c:.4}");
    assert!((c - 0.5607).abs() < 0.005, "cosine {c}");
}

#[test]
fn padding_does_not_change_an_embedding() {
    let model = assets::minilm();
    let alone = model
        .embed(&["Turn on the kitchen lights"])
        .expect("embeds");
    let batch = model
        .embed(&[
            "A much longer sentence that forces the batch to be padded well beyond the short one, \
             with plenty of extra words to make the difference obvious",
            "Turn on the kitchen lights",
            "Another sentence of some middling length for good measure",
        ])
        .expect("embeds");
    let max_diff = alone[0]
        .iter()
        .zip(&batch[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-5, "max difference {max_diff}");
}

#[test]
fn long_and_empty_inputs() {
    let model = assets::minilm();
    assert!(model.embed(&[]).expect("embeds nothing").is_empty());
    let long = "word ".repeat(2000);
    let counts = model.token_counts(&[long.as_str()]).expect("tokenises");
    assert_eq!(counts, vec![512], "truncated to the model's maximum");
    let v = model.embed(&[long.as_str(), ""]).expect("embeds");
    assert_eq!(v.len(), 2);
    assert!(
        v.iter()
            .all(|e| e.len() == 384 && e.iter().all(|x| x.is_finite()))
    );
}
