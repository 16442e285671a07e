//! Quantised matrix products of the native LLM engine: weights stay in
//! their GGUF quantisation (4-bit Q4_1 or 8-bit Q8_0), activations are
//! quantised to 8 bits per block of 32, and each block's dot product is an
//! integer sum, as llama.cpp computes it.
//!
//! Both weight types are held in one affine form: a block of 32 weights of
//! one row is `dᵢ·u + mᵢ` with `u` an unsigned integer (a 4-bit nibble for
//! Q4_1, `q + 128` for Q8_0, whose `m` is then `-128·d`). An activation
//! block is `a·q` with `q` a signed byte, and `s = a·Σq`. Then one block of
//! one product is `d·a·Σ(u·q) + m·s`: the integer sum is what AVX-512 VNNI's
//! `vpdpbusd` computes (unsigned bytes times signed bytes), four products
//! per 32-bit lane.
//!
//! A [`QMatrix`] keeps its rows in panels of [`PANEL`] (16) rows. Per panel
//! and block, the quantised values are interleaved four bytes per row (one
//! 512-bit register holds four consecutive bytes of each of the 16 rows),
//! followed by the 16 `d` and 16 `m` as half-precision floats. A Q4_1 block
//! keeps its nibbles packed (byte `j` holds values `j` and `j + 16`), so the
//! matrix takes as many bytes as in the file.
//!
//! The product walks a panel once per tile of up to [`TILE`] activation rows
//! (tokens), with the tile's 16 sums per row in registers. Threads split the
//! panels. On CPUs with AVX-512 VNNI the tile is written with its
//! intrinsics; elsewhere a portable loop computes the same sums.

// SIMD intrinsics and disjoint writes from the threads of a team.
#![allow(unsafe_code)]

use crate::embedding::kernels::{Shared2d, Team, share};

/// Rows of one panel (one 512-bit register of f32 sums).
pub(crate) const PANEL: usize = 16;
/// Most activation rows of one register tile.
pub(crate) const TILE: usize = 8;
/// Values of one quantisation block.
pub(crate) const BLOCK: usize = 32;

/// ggml type ids of the weight types the engine reads.
pub(crate) const GGML_Q4_1: u32 = 3;
pub(crate) const GGML_Q8_0: u32 = 8;

/// How the unsigned values of a matrix are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QFormat {
    /// Two 4-bit values per byte (from Q4_1).
    Nibbles,
    /// One byte per value (from Q8_0, shifted by 128).
    Bytes,
}

impl QFormat {
    /// The format of a ggml type, if the engine reads it.
    pub(crate) fn of_ggml(ggml_type: u32) -> Option<QFormat> {
        match ggml_type {
            GGML_Q4_1 => Some(QFormat::Nibbles),
            GGML_Q8_0 => Some(QFormat::Bytes),
            _ => None,
        }
    }

    /// Bytes of one block of one row in the GGUF file.
    pub(crate) fn file_block_bytes(self) -> usize {
        match self {
            QFormat::Nibbles => 20,
            QFormat::Bytes => 34,
        }
    }

    /// Bytes of the quantised values of one block of one row.
    fn value_bytes(self) -> usize {
        match self {
            QFormat::Nibbles => BLOCK / 2,
            QFormat::Bytes => BLOCK,
        }
    }
}

/// A weight matrix of `rows × cols` (`cols` a multiple of 32), in panels.
pub(crate) struct QMatrix {
    format: QFormat,
    /// Rows (outputs).
    pub(super) rows: usize,
    /// Columns (inputs).
    pub(super) cols: usize,
    blocks: usize,
    /// Per panel and block: `PANEL × value_bytes` interleaved values.
    values: Vec<u8>,
    /// Per panel and block: 16 `d` then 16 `m`, half-precision bits.
    scales: Vec<u16>,
}

impl QMatrix {
    /// Packs rows given in the GGUF layout: `parts` are stacked (each
    /// `rows × cols` of `format`, row-major, `cols / 32` blocks per row).
    ///
    /// # Panics
    /// If a part's length does not match its row count.
    pub(crate) fn pack(format: QFormat, cols: usize, parts: &[(&[u8], usize)]) -> QMatrix {
        assert!(cols.is_multiple_of(BLOCK), "columns must fill whole blocks");
        let blocks = cols / BLOCK;
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let panels = rows.div_ceil(PANEL);
        let vb = format.value_bytes();
        let fb = format.file_block_bytes();
        let mut values = vec![0u8; panels * blocks * PANEL * vb];
        let mut scales = vec![0u16; panels * blocks * 2 * PANEL];
        let mut row = 0;
        for &(data, n) in parts {
            assert_eq!(data.len(), n * blocks * fb, "part size");
            for r in 0..n {
                let (panel, lane) = (row / PANEL, row % PANEL);
                for b in 0..blocks {
                    let src = &data[(r * blocks + b) * fb..(r * blocks + b + 1) * fb];
                    let at = panel * blocks + b;
                    let d = u16::from_le_bytes([src[0], src[1]]);
                    let (m, quants) = match format {
                        QFormat::Nibbles => (u16::from_le_bytes([src[2], src[3]]), &src[4..]),
                        QFormat::Bytes => {
                            let m = half::f16::from_bits(d).to_f32() * -128.0;
                            (half::f16::from_f32(m).to_bits(), &src[2..])
                        }
                    };
                    scales[at * 2 * PANEL + lane] = d;
                    scales[at * 2 * PANEL + PANEL + lane] = m;
                    let dst = &mut values[at * PANEL * vb..(at + 1) * PANEL * vb];
                    for (g, group) in quants.chunks_exact(4).enumerate() {
                        for (i, &q) in group.iter().enumerate() {
                            dst[g * 4 * PANEL + lane * 4 + i] = match format {
                                QFormat::Nibbles => q,
                                QFormat::Bytes => q ^ 0x80,
                            };
                        }
                    }
                }
                row += 1;
            }
        }
        QMatrix {
            format,
            rows,
            cols,
            blocks,
            values,
            scales,
        }
    }

    /// Bytes the packed matrix takes.
    pub(crate) fn bytes(&self) -> usize {
        self.values.len() + self.scales.len() * 2
    }

    /// Row `row` as floats (the embedding lookup).
    pub(crate) fn row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows && out.len() == self.cols,
            "row out of range"
        );
        let (panel, lane) = (row / PANEL, row % PANEL);
        let vb = self.format.value_bytes();
        for b in 0..self.blocks {
            let at = panel * self.blocks + b;
            let d = half::f16::from_bits(self.scales[at * 2 * PANEL + lane]).to_f32();
            let m = half::f16::from_bits(self.scales[at * 2 * PANEL + PANEL + lane]).to_f32();
            let v = &self.values[at * PANEL * vb..(at + 1) * PANEL * vb];
            let dst = &mut out[b * BLOCK..(b + 1) * BLOCK];
            for (e, o) in dst.iter_mut().enumerate() {
                *o = d * f32::from(self.value(v, lane, e)) + m;
            }
        }
    }

    /// The unsigned value of element `e` (0..32) of `lane` in one block's
    /// interleaved values `v`.
    fn value(&self, v: &[u8], lane: usize, e: usize) -> u8 {
        match self.format {
            QFormat::Nibbles => {
                let j = e % 16;
                let byte = v[(j / 4) * 4 * PANEL + lane * 4 + j % 4];
                if e < 16 { byte & 0x0f } else { byte >> 4 }
            }
            QFormat::Bytes => v[(e / 4) * 4 * PANEL + lane * 4 + e % 4],
        }
    }

    /// `out[r] (+)= W · a[r]` for the `a.rows()` activation rows: `out` is
    /// `rows × self.rows()` row-major; with `accumulate` the products are
    /// added to what `out` holds (a residual). Split by panels between the
    /// threads of `team`.
    pub(crate) fn forward(&self, team: &Team, a: &QActs, out: &mut [f32], accumulate: bool) {
        assert_eq!(a.cols, self.cols, "activation width");
        let m = a.rows;
        assert!(out.len() >= m * self.rows, "output shape");
        if m == 0 {
            return;
        }
        let panels = self.rows.div_ceil(PANEL);
        let dst = Shared2d::new(out, m, self.rows);
        let simd = vnni_available();
        team.run(&|t, size| {
            let (first, last) = share(panels, t, size);
            for p in first..last {
                let mut r = 0;
                while r < m {
                    let n = (m - r).min(TILE);
                    // Only this thread writes the rows of panel `p`.
                    self.tile(a, p, r, n, dst, accumulate, simd);
                    r += n;
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        a: &QActs,
        panel: usize,
        row: usize,
        n: usize,
        dst: Shared2d,
        accumulate: bool,
        simd: bool,
    ) {
        let lanes = (self.rows - panel * PANEL).min(PANEL);
        #[cfg(target_arch = "x86_64")]
        if simd {
            let ptr = dst.tile_ptr(row, n, panel * PANEL, lanes);
            // SAFETY: AVX-512F/BW/VNNI and F16C were detected at run time;
            // `ptr` has `lanes` values in bounds in each of the `n` rows
            // (stride `self.rows`), written by this thread alone.
            unsafe { avx512::tile(self, a, panel, row, n, lanes, ptr, accumulate) };
            return;
        }
        let _ = simd;
        self.portable_tile(a, panel, row, n, lanes, dst, accumulate);
    }

    #[allow(clippy::too_many_arguments)]
    fn portable_tile(
        &self,
        a: &QActs,
        panel: usize,
        row: usize,
        n: usize,
        lanes: usize,
        dst: Shared2d,
        accumulate: bool,
    ) {
        let vb = self.format.value_bytes();
        let mut acc = [[0f32; PANEL]; TILE];
        for b in 0..self.blocks {
            let at = panel * self.blocks + b;
            let v = &self.values[at * PANEL * vb..(at + 1) * PANEL * vb];
            let sc = &self.scales[at * 2 * PANEL..(at + 1) * 2 * PANEL];
            for (t, sums) in acc.iter_mut().enumerate().take(n) {
                let r = row + t;
                let q = &a.qs[r * a.cols + b * BLOCK..r * a.cols + (b + 1) * BLOCK];
                let da = a.d[r * self.blocks + b];
                let sa = a.s[r * self.blocks + b];
                for (lane, sum) in sums.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for (e, &qe) in q.iter().enumerate() {
                        isum += i32::from(self.value(v, lane, e)) * i32::from(qe);
                    }
                    let d = half::f16::from_bits(sc[lane]).to_f32();
                    let m = half::f16::from_bits(sc[PANEL + lane]).to_f32();
                    *sum = (isum as f32).mul_add(d * da, *sum);
                    *sum = m.mul_add(sa, *sum);
                }
            }
        }
        for (t, sums) in acc.iter().enumerate().take(n) {
            // SAFETY: the caller alone writes this panel's values of these rows.
            let out = unsafe { dst.part_mut(row + t, panel * PANEL, lanes) };
            for (o, s) in out.iter_mut().zip(sums) {
                *o = if accumulate { *o + s } else { *s };
            }
        }
    }
}

/// Activations quantised per block of 32: `rows × cols` signed bytes with a
/// scale `d` and `s = d·Σq` per block.
#[derive(Default)]
pub(crate) struct QActs {
    rows: usize,
    cols: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl QActs {
    /// Quantises `x` (`rows × cols`, `cols` a multiple of 32) in place of
    /// what this held. Each block's scale is its largest magnitude over 127,
    /// kept at half precision as llama.cpp keeps it.
    pub(crate) fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(BLOCK) && x.len() >= rows * cols,
            "shape"
        );
        let blocks = cols / BLOCK;
        self.rows = rows;
        self.cols = cols;
        self.qs.resize(rows * cols, 0);
        self.d.resize(rows * blocks, 0.0);
        self.s.resize(rows * blocks, 0.0);
        for (i, block) in x[..rows * cols].chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.qs[i * BLOCK..(i + 1) * BLOCK];
            let mut sum = 0i32;
            for (o, v) in q.iter_mut().zip(block) {
                let r = (v * id).round_ties_even() as i32;
                sum += r;
                *o = r as i8;
            }
            let dh = half::f16::from_f32(d).to_f32();
            self.d[i] = dh;
            self.s[i] = dh * sum as f32;
        }
    }
}

/// Whether the AVX-512 VNNI tile can run on this CPU: the encoder's
/// AVX-512 features, byte operations and VNNI.
pub(crate) fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::embedding::kernels::avx512_available()
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, PANEL, QActs, QFormat, QMatrix, TILE};

    /// One tile of `n` (1..=TILE) activation rows from `row` against
    /// `panel`, stored from `dst` (row stride `m.rows`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX-512BW, AVX-512 VNNI and F16C;
    /// `lanes` values from `dst` in each of the `n` rows must be writable by
    /// this thread alone.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,avx2,fma")]
    pub(super) unsafe fn tile(
        m: &QMatrix,
        a: &QActs,
        panel: usize,
        row: usize,
        n: usize,
        lanes: usize,
        dst: *mut f32,
        accumulate: bool,
    ) {
        // SAFETY (all arms): as required of this function.
        unsafe {
            match n {
                1 => body::<1>(m, a, panel, row, lanes, dst, accumulate),
                2 => body::<2>(m, a, panel, row, lanes, dst, accumulate),
                3 => body::<3>(m, a, panel, row, lanes, dst, accumulate),
                4 => body::<4>(m, a, panel, row, lanes, dst, accumulate),
                5 => body::<5>(m, a, panel, row, lanes, dst, accumulate),
                6 => body::<6>(m, a, panel, row, lanes, dst, accumulate),
                7 => body::<7>(m, a, panel, row, lanes, dst, accumulate),
                _ => body::<TILE>(m, a, panel, row, lanes, dst, accumulate),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,avx2,fma")]
    unsafe fn body<const T: usize>(
        m: &QMatrix,
        a: &QActs,
        panel: usize,
        row: usize,
        lanes: usize,
        dst: *mut f32,
        accumulate: bool,
    ) {
        let blocks = m.blocks;
        let vb = m.format.value_bytes();
        assert!(a.qs.len() >= (row + T) * a.cols && a.d.len() >= (row + T) * blocks);
        assert!(m.values.len() >= (panel + 1) * blocks * PANEL * vb);
        assert!(m.scales.len() >= (panel + 1) * blocks * 2 * PANEL);
        let mask: __mmask16 = if lanes >= PANEL {
            0xffff
        } else {
            ((1u32 << lanes) - 1) as __mmask16
        };
        // SAFETY: every read below is inside the slices asserted above (a
        // block's values are `PANEL × vb` bytes, its scales 32 halves, an
        // activation row `cols` bytes and `blocks` scales); `dst` is valid
        // for `lanes` values of each of the `T` rows (the caller's promise),
        // and masked loads and stores touch only those.
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            let mut acc = [_mm512_setzero_ps(); T];
            let values = m.values.as_ptr().add(panel * blocks * PANEL * vb);
            let scales = m.scales.as_ptr().add(panel * blocks * 2 * PANEL);
            let qs = a.qs.as_ptr().add(row * a.cols);
            for b in 0..blocks {
                let v = values.add(b * PANEL * vb);
                let mut isum = [_mm512_setzero_si512(); T];
                match m.format {
                    QFormat::Nibbles => {
                        for g in 0..4 {
                            let w = _mm512_loadu_si512(v.add(g * 64).cast());
                            let lo = _mm512_and_si512(w, low);
                            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                            for (t, s) in isum.iter_mut().enumerate() {
                                let q = qs.add(t * a.cols + b * BLOCK);
                                let ql =
                                    _mm512_set1_epi32(q.add(g * 4).cast::<i32>().read_unaligned());
                                let qh = _mm512_set1_epi32(
                                    q.add(16 + g * 4).cast::<i32>().read_unaligned(),
                                );
                                *s = _mm512_dpbusd_epi32(*s, lo, ql);
                                *s = _mm512_dpbusd_epi32(*s, hi, qh);
                            }
                        }
                    }
                    QFormat::Bytes => {
                        for g in 0..8 {
                            let w = _mm512_loadu_si512(v.add(g * 64).cast());
                            for (t, s) in isum.iter_mut().enumerate() {
                                let q = qs.add(t * a.cols + b * BLOCK);
                                let q4 =
                                    _mm512_set1_epi32(q.add(g * 4).cast::<i32>().read_unaligned());
                                *s = _mm512_dpbusd_epi32(*s, w, q4);
                            }
                        }
                    }
                }
                let sc = scales.add(b * 2 * PANEL);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sc.cast()));
                let mn = _mm512_cvtph_ps(_mm256_loadu_si256(sc.add(PANEL).cast()));
                for (t, s) in isum.iter().enumerate() {
                    let k = (row + t) * blocks + b;
                    let da = _mm512_set1_ps(*a.d.get_unchecked(k));
                    let sa = _mm512_set1_ps(*a.s.get_unchecked(k));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), _mm512_mul_ps(d, da), acc[t]);
                    acc[t] = _mm512_fmadd_ps(mn, sa, acc[t]);
                }
            }
            for (t, v) in acc.iter().enumerate() {
                let p = dst.add(t * m.rows);
                let mut v = *v;
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p));
                }
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedding::kernels::test_values as values;

    /// Quantises `w` (`rows × cols`) into GGUF Q4_1 or Q8_0 blocks, and
    /// returns them with the values they stand for.
    fn quantize_weights(w: &[f32], format: QFormat) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut exact = Vec::new();
        for block in w.chunks_exact(BLOCK) {
            match format {
                QFormat::Nibbles => {
                    let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = half::f16::from_f32((hi - lo) / 15.0);
                    let m = half::f16::from_f32(lo);
                    let (df, mf) = (d.to_f32(), m.to_f32());
                    let u: Vec<u8> = block
                        .iter()
                        .map(|v| (((v - mf) / df).round().clamp(0.0, 15.0)) as u8)
                        .collect();
                    bytes.extend(d.to_bits().to_le_bytes());
                    bytes.extend(m.to_bits().to_le_bytes());
                    bytes.extend((0..16).map(|j| u[j] | (u[j + 16] << 4)));
                    exact.extend(u.iter().map(|&u| df * f32::from(u) + mf));
                }
                QFormat::Bytes => {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = half::f16::from_f32(amax / 127.0);
                    let df = d.to_f32();
                    let q: Vec<i8> = block.iter().map(|v| (v / df).round() as i8).collect();
                    bytes.extend(d.to_bits().to_le_bytes());
                    bytes.extend(q.iter().map(|&q| q as u8));
                    exact.extend(q.iter().map(|&q| df * f32::from(q)));
                }
            }
        }
        (bytes, exact)
    }

    #[test]
    fn products_match_the_dequantised_weights_for_both_formats_and_team_sizes() {
        for format in [QFormat::Nibbles, QFormat::Bytes] {
            for &(m, n, k) in &[(1, 16, 32), (3, 20, 64), (13, 48, 96), (9, 40, 576)] {
                let w = values(n * k, 1);
                let x = values(m * k, 2);
                let (bytes, exact) = quantize_weights(&w, format);
                // Two stacked parts, as the engine fuses Q, K and V.
                let split = n / 2;
                let fb = format.file_block_bytes() * (k / BLOCK);
                let q = QMatrix::pack(
                    format,
                    k,
                    &[
                        (&bytes[..split * fb], split),
                        (&bytes[split * fb..], n - split),
                    ],
                );
                assert_eq!(q.rows, n);
                let mut row = vec![0f32; k];
                q.row(n - 1, &mut row);
                for (a, b) in row.iter().zip(&exact[(n - 1) * k..]) {
                    assert!((a - b).abs() < 1e-6, "row lookup {a} vs {b}");
                }
                let mut acts = QActs::default();
                acts.quantize(&x, m, k);
                for threads in [1, 2, 3] {
                    let team = Team::new(threads, "test").expect("team");
                    let mut out = vec![1.0f32; m * n];
                    q.forward(&team, &acts, &mut out, true);
                    for r in 0..m {
                        for c in 0..n {
                            let want: f64 = (0..k)
                                .map(|p| f64::from(x[r * k + p]) * f64::from(exact[c * k + p]))
                                .sum::<f64>()
                                + 1.0;
                            let got = f64::from(out[r * n + c]);
                            // Activations are quantised to 8 bits: about
                            // 1/254 of each block's largest value per term.
                            let tol = 0.02 * (k as f64).sqrt();
                            assert!(
                                (got - want).abs() < tol,
                                "{format:?} {m}x{n}x{k} t={threads} [{r},{c}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_tile_agrees_with_the_dispatched_one() {
        let (m, n, k) = (8, 24, 128);
        let w = values(n * k, 3);
        let x = values(m * k, 4);
        for format in [QFormat::Nibbles, QFormat::Bytes] {
            let (bytes, _) = quantize_weights(&w, format);
            let q = QMatrix::pack(format, k, &[(&bytes, n)]);
            let mut acts = QActs::default();
            acts.quantize(&x, m, k);
            let mut a = vec![0f32; m * n];
            let mut b = vec![0f32; m * n];
            for panel in 0..2 {
                let lanes = (n - panel * PANEL).min(PANEL);
                q.tile(
                    &acts,
                    panel,
                    0,
                    m,
                    Shared2d::new(&mut a, m, n),
                    false,
                    vnni_available(),
                );
                q.portable_tile(
                    &acts,
                    panel,
                    0,
                    m,
                    lanes,
                    Shared2d::new(&mut b, m, n),
                    false,
                );
            }
            for (i, (p, r)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - r).abs() <= 1e-4 * r.abs().max(1.0),
                    "{format:?} [{i}] {p} vs {r}"
                );
            }
        }
    }

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x = values(3 * 64, 9);
        let mut a = QActs::default();
        a.quantize(&x, 3, 64);
        for (i, v) in x.iter().enumerate() {
            let d = a.d[i / BLOCK];
            let back = d * f32::from(a.qs[i]);
            assert!((back - v).abs() <= 0.6 * d + 1e-6, "[{i}] {back} vs {v}");
        }
        let sum: i32 = a.qs[..BLOCK].iter().map(|&q| i32::from(q)).sum();
        assert!((a.s[0] - a.d[0] * sum as f32).abs() < 1e-6);
    }
}
