//! Half-Space Trees on river's shuttle data set.

use runtime::anomaly::{self, HstConfig, StreamingDetector, ThresholdRule};

use crate::assets;

#[test]
fn half_space_trees_on_shuttle() {
    let data = anomaly::load_shuttle(&assets::path(assets::SHUTTLE)).expect("loads");
    assert_eq!(data.readings.len(), 49_097);
    assert_eq!(data.feature_names.len(), 9);
    let mut detector = StreamingDetector::new(9, HstConfig::default()).expect("valid");
    // Flags for F1: the top 7% of scores, the data set's documented anomaly
    // share used as the contamination prior.
    let eval = anomaly::evaluate(&mut detector, &data, ThresholdRule::Contamination(0.07))
        .expect("evaluates");
    eprintln!("shuttle: {eval:?}");
    // Over seeds 1-7 and 42 the ROC-AUC ranges from 0.964 to 0.983 (river's
    // HalfSpaceTrees with a min-max scaler scores around 0.9+); 0.95 leaves
    // room for the seed while a broken detector (0.5 is chance) fails.
    assert!(eval.roc_auc > 0.95, "roc-auc {}", eval.roc_auc);
    assert!(eval.f1 > 0.6, "f1 {}", eval.f1);
}
