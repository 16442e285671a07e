//! The arithmetic of both models: forward pass, softmax cross-entropy, the
//! hand-written backward pass and the mini-batch SGD loop.
//!
//! Everything here works on borrowed buffers that the caller allocates once
//! per training run ([`Workspace`] and the gradient), so the per-example
//! work allocates nothing: the simulator trains a thousand clients a round.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{Dataset, LocalTraining, ModelSpec};

/// Where each tensor starts in the flat parameter vector. Built only from a
/// validated [`ModelSpec`], so the offsets cannot overflow.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub(super) inputs: usize,
    pub(super) hidden: usize,
    pub(super) classes: usize,
    /// Offset of `hidden.bias`; `hidden.weight` starts at 0.
    pub(super) b1: usize,
    /// Offset of `output.weight`.
    pub(super) w2: usize,
    /// Offset of `output.bias`.
    pub(super) b2: usize,
    /// Total number of parameters.
    pub(super) len: usize,
}

impl Layout {
    pub(super) fn new(spec: &ModelSpec) -> Self {
        let b1 = spec.hidden * spec.inputs;
        let w2 = b1 + spec.hidden;
        let fan_in = if spec.hidden > 0 {
            spec.hidden
        } else {
            spec.inputs
        };
        let b2 = w2 + spec.classes * fan_in;
        Self {
            inputs: spec.inputs,
            hidden: spec.hidden,
            classes: spec.classes,
            b1,
            w2,
            b2,
            len: b2 + spec.classes,
        }
    }

    /// Number of inputs of the output layer.
    pub(super) fn out_inputs(&self) -> usize {
        if self.hidden > 0 {
            self.hidden
        } else {
            self.inputs
        }
    }

    /// Computes the logits of `x` into `ws.out` (and the hidden activations
    /// into `ws.act`).
    pub(super) fn forward(&self, params: &[f32], x: &[f32], ws: &mut Workspace) {
        let (w2, b2) = (&params[self.w2..self.b2], &params[self.b2..self.len]);
        if self.hidden == 0 {
            affine(w2, b2, x, &mut ws.out);
            return;
        }
        affine(
            &params[..self.b1],
            &params[self.b1..self.w2],
            x,
            &mut ws.act,
        );
        for a in &mut ws.act {
            *a = a.max(0.0);
        }
        affine(w2, b2, &ws.act, &mut ws.out);
    }

    /// Adds the gradient of the example's cross-entropy loss to `grad`.
    /// Expects `ws.out` to hold the softmax probabilities of `x` (left there
    /// by [`forward`](Self::forward) and [`softmax_cross_entropy`]), and
    /// overwrites them.
    pub(super) fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        label: usize,
        ws: &mut Workspace,
        grad: &mut [f32],
    ) {
        // The gradient of softmax cross-entropy with respect to the logits
        // is the probabilities minus the one-hot label.
        ws.out[label] -= 1.0;
        let k = self.out_inputs();
        let a_in: &[f32] = if self.hidden > 0 { &ws.act } else { x };
        let (g_hidden, g_out) = grad.split_at_mut(self.w2);
        let (g_w2, g_b2) = g_out.split_at_mut(self.b2 - self.w2);
        for ((&d, g_row), g_b) in ws.out.iter().zip(g_w2.chunks_exact_mut(k)).zip(g_b2) {
            axpy(d, a_in, g_row);
            *g_b += d;
        }
        if self.hidden == 0 {
            return;
        }
        ws.dact.fill(0.0);
        for (&d, w_row) in ws.out.iter().zip(params[self.w2..self.b2].chunks_exact(k)) {
            axpy(d, w_row, &mut ws.dact);
        }
        let (g_w1, g_b1) = g_hidden.split_at_mut(self.b1);
        for (((&a, &d), g_row), g_b) in ws
            .act
            .iter()
            .zip(&ws.dact)
            .zip(g_w1.chunks_exact_mut(self.inputs))
            .zip(g_b1)
        {
            // ReLU passes the gradient only where the unit was active; a
            // unit is active exactly where its activation is positive.
            if a > 0.0 {
                axpy(d, x, g_row);
                *g_b += d;
            }
        }
    }
}

/// The per-example buffers of a forward and backward pass.
pub(super) struct Workspace {
    /// Hidden activations after ReLU.
    act: Vec<f32>,
    /// Gradient with respect to the hidden activations.
    dact: Vec<f32>,
    /// Logits, then probabilities, then the gradient of the logits.
    pub(super) out: Vec<f32>,
}

impl Workspace {
    pub(super) fn new(layout: &Layout) -> Self {
        Self {
            act: vec![0.0; layout.hidden],
            dact: vec![0.0; layout.hidden],
            out: vec![0.0; layout.classes],
        }
    }
}

/// Turns logits into probabilities in place and returns the cross-entropy
/// loss of `label`, computed as `logsumexp(z) − z[label]` after subtracting
/// the largest logit so that no exponential overflows.
pub(super) fn softmax_cross_entropy(z: &mut [f32], label: usize) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let shifted_label = z[label] - max;
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in z.iter_mut() {
        *v *= inv;
    }
    sum.ln() - shifted_label
}

/// Index of the largest value, the first one on ties; NaN never wins.
pub(super) fn argmax(z: &[f32]) -> usize {
    let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
    for (i, &v) in z.iter().enumerate() {
        if v > best_value {
            (best, best_value) = (i, v);
        }
    }
    best
}

/// Mini-batch SGD over `data`, in place on `params`, reshuffled every epoch
/// from `rng`. With `anchor`, adds FedProx's proximal gradient
/// `mu · (w − anchor)`. Returns the mean cross-entropy loss over the last
/// epoch, each example's loss taken before its batch's step.
pub(super) fn sgd(
    layout: &Layout,
    params: &mut [f32],
    anchor: Option<&[f32]>,
    data: &Dataset,
    config: &LocalTraining,
    rng: &mut ChaCha8Rng,
) -> f64 {
    let mut ws = Workspace::new(layout);
    let mut grad = vec![0.0f32; layout.len];
    let mut order: Vec<usize> = (0..data.len()).collect();
    let batch = config.batch_size as usize;
    let mut epoch_loss = 0.0f64;
    for _ in 0..config.epochs {
        order.shuffle(rng);
        epoch_loss = 0.0;
        for chunk in order.chunks(batch) {
            for &i in chunk {
                let x = data.row(i);
                let label = data.labels[i] as usize;
                layout.forward(params, x, &mut ws);
                epoch_loss += f64::from(softmax_cross_entropy(&mut ws.out, label));
                layout.backward(params, x, label, &mut ws, &mut grad);
            }
            step(params, &mut grad, anchor, chunk.len(), config);
        }
    }
    epoch_loss / data.len() as f64
}

/// One SGD step from the summed gradient of a batch, which it also clears
/// for the next batch.
///
/// The loss gradient is taken explicitly, but the two quadratic penalties
/// (FedProx's `mu/2 · ‖w − anchor‖²` and weight decay's `wd/2 · ‖w‖²`, on
/// every parameter, biases included) are taken implicitly, as a proximal
/// step: `w ← (w − lr·g + lr·mu·anchor) / (1 + lr·(mu + wd))`. To first
/// order in the learning rate this is the plain gradient step, but it is
/// stable for any `mu`, where the explicit step overshoots and diverges
/// once `lr · mu > 2`, which FedProx's recommended values of `mu` can reach.
fn step(
    params: &mut [f32],
    grad: &mut [f32],
    anchor: Option<&[f32]>,
    batch: usize,
    config: &LocalTraining,
) {
    let lr = config.learning_rate;
    let lr_batch = lr / batch as f32;
    match anchor {
        Some(anchor) if config.proximal_mu > 0.0 => {
            let pull = lr * config.proximal_mu;
            let shrink = 1.0 / (1.0 + lr * (config.proximal_mu + config.weight_decay));
            for ((w, g), &a) in params.iter_mut().zip(grad.iter_mut()).zip(anchor) {
                *w = (*w - lr_batch * *g + pull * a) * shrink;
                *g = 0.0;
            }
        }
        _ => {
            let shrink = 1.0 / (1.0 + lr * config.weight_decay);
            for (w, g) in params.iter_mut().zip(grad.iter_mut()) {
                *w = (*w - lr_batch * *g) * shrink;
                *g = 0.0;
            }
        }
    }
}

/// Accuracy counts and summed loss of `params` over `data`.
pub(super) fn evaluate(layout: &Layout, params: &[f32], data: &Dataset) -> (usize, f64) {
    let mut ws = Workspace::new(layout);
    let mut correct = 0;
    let mut loss = 0.0f64;
    for (i, &label) in data.labels.iter().enumerate() {
        layout.forward(params, data.row(i), &mut ws);
        if argmax(&ws.out) == label as usize {
            correct += 1;
        }
        loss += f64::from(softmax_cross_entropy(&mut ws.out, label as usize));
    }
    (correct, loss)
}

/// Mean loss and mean gradient over `data`: the quantity SGD follows,
/// exposed for the finite-difference check.
#[cfg(test)]
pub(super) fn loss_and_gradient(
    layout: &Layout,
    params: &[f32],
    data: &Dataset,
) -> (f64, Vec<f32>) {
    let mut ws = Workspace::new(layout);
    let mut grad = vec![0.0f32; layout.len];
    let mut loss = 0.0f64;
    for (i, &label) in data.labels.iter().enumerate() {
        let x = data.row(i);
        layout.forward(params, x, &mut ws);
        loss += f64::from(softmax_cross_entropy(&mut ws.out, label as usize));
        layout.backward(params, x, label as usize, &mut ws, &mut grad);
    }
    let n = data.len() as f32;
    grad.iter_mut().for_each(|g| *g /= n);
    (loss / f64::from(n), grad)
}

/// `out = W · x + b` for a row-major `W` of `out.len()` rows.
fn affine(w: &[f32], b: &[f32], x: &[f32], out: &mut [f32]) {
    for ((o, row), &bias) in out.iter_mut().zip(w.chunks_exact(x.len())).zip(b) {
        *o = bias + dot(row, x);
    }
}

/// Dot product with eight independent accumulators: a single running sum
/// is a dependency chain the compiler may not reorder, so it would neither
/// vectorise nor pipeline.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    let mut acc = [0.0f32; 8];
    for (x, y) in a8.iter().zip(b8) {
        for ((s, &xi), &yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (&xi, &yi) in a_rest.iter().zip(b_rest) {
        sum += xi * yi;
    }
    sum
}

/// `y += alpha · x`.
#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let mut z = [1000.0, 1000.0, -1000.0];
        let loss = softmax_cross_entropy(&mut z, 0);
        assert!((loss - std::f32::consts::LN_2).abs() < 1e-6);
        assert!((z[0] - 0.5).abs() < 1e-6 && (z[1] - 0.5).abs() < 1e-6);
        assert_eq!(z[2], 0.0);
    }

    #[test]
    fn dot_matches_naive_sum_for_every_tail_length() {
        for n in 0..20 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 2.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn argmax_takes_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 2.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[0.0, f32::NAN, 1.0]), 2);
    }
}
