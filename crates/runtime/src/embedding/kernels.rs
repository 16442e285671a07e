//! Compute kernels of the native encoder: a team of threads that split each
//! operation between them, and matrix products against weights packed once
//! at load time.
//!
//! A linear layer `y = x·Wᵀ + b` keeps `W` as panels of [`NR`] output
//! columns: panel `j` holds outputs `32j..32j+32` as `k` rows of 32
//! consecutive values (half or single precision; zero past the last output).
//! The product walks a panel once per tile of up to [`MR`] input rows, with
//! the tile's 12×32 sums in registers; bias, a residual and GELU are applied
//! as the tile is stored. On x86-64 CPUs with AVX-512 the tile is written
//! with its intrinsics (selected at run time); elsewhere a portable loop over
//! the same layout runs, which the compiler vectorises for the target.
//!
//! The threads of a [`Team`] split a product by panels (each writes its own
//! columns), so no thread waits for another inside an operation; between
//! operations they meet at one atomic counter. Helpers spin briefly for the
//! next operation (an encoder runs some forty of them per call, a few
//! microseconds apart) and sleep once none comes.

// Raw pointers and SIMD intrinsics are the point of this module: threads
// write disjoint parts of one buffer, and tiles are computed in registers.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Output columns of one packed panel.
pub(crate) const NR: usize = 32;
/// Most input rows of one register tile.
pub(crate) const MR: usize = 12;
/// Input rows are processed in blocks of about this many bytes, so that a
/// block stays in the core's L2 cache while every panel passes over it.
const ROW_BLOCK_BYTES: usize = 192 * 1024;
/// Spins (about a quarter of a millisecond) a helper waits for the next
/// operation before it sleeps.
const SPIN_LIMIT: u32 = 1 << 14;

/// A job the team runs: called once per thread with `(index, team size)`.
type Job = dyn Fn(usize, usize) + Sync;

/// Threads that run one operation together. Thread 0 is the caller of
/// [`Team::run`]; the others are helpers owned by the team.
pub(crate) struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    size: usize,
}

struct Shared {
    /// Bumped once per operation, after `job` is set.
    generation: AtomicU64,
    /// Helpers that have not finished the current operation.
    pending: AtomicUsize,
    /// The current operation; written only while no helper runs one.
    job: UnsafeCell<Option<*const Job>>,
    stop: AtomicBool,
    panicked: AtomicBool,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by `Team::run` before the Release/SeqCst bump of
// `generation` and only read by helpers after they observe that bump; it is
// not written again before every helper has decremented `pending`.
unsafe impl Sync for Shared {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

impl Team {
    /// A team of `size` threads (at least 1): the caller and `size - 1` helpers.
    pub(crate) fn new(size: usize, name: &str) -> std::io::Result<Team> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut team = Team {
            shared,
            helpers: Vec::new(),
            size,
        };
        for index in 1..size {
            let shared = Arc::clone(&team.shared);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || helper(&shared, index, size))?;
            team.helpers.push(handle);
        }
        Ok(team)
    }

    /// Runs `job(i, size)` on every thread `i` of the team and returns when
    /// all have finished. A panic in any of them is raised here.
    pub(crate) fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        if self.size == 1 {
            job(0, 1);
            return;
        }
        let shared = &*self.shared;
        // SAFETY: the pointer is only used by helpers until they decrement
        // `pending`, and this function returns only once `pending` is 0, so
        // `job` outlives every use; no helper is reading `job` now (the
        // previous operation ended with `pending` at 0).
        unsafe {
            let erased =
                std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), *const Job>(job);
            *shared.job.get() = Some(erased);
        }
        shared.pending.store(self.size - 1, Ordering::SeqCst);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let own = catch_unwind(AssertUnwindSafe(|| job(0, self.size)));
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(payload) = own {
            resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("an encoder thread panicked");
        }
    }
}

fn helper(shared: &Shared, index: usize, size: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleeping.fetch_add(1, Ordering::SeqCst);
            while shared.generation.load(Ordering::SeqCst) == seen
                && !shared.stop.load(Ordering::SeqCst)
            {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            shared.sleeping.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // SAFETY: `job` was set before the generation this helper observed
        // and stays valid until it decrements `pending` below.
        let job = unsafe { *shared.job.get() };
        if let Some(job) = job {
            // SAFETY: see above; the caller of `run` is still waiting.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index, size) }));
            if result.is_err() {
                shared.panicked.store(true, Ordering::SeqCst);
            }
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// The part `[start, end)` of `0..n` that thread `index` of `size` takes.
pub(crate) fn share(n: usize, index: usize, size: usize) -> (usize, usize) {
    (n * index / size, n * (index + 1) / size)
}

/// A mutable buffer that the threads of a team write in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct Shared2d {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: users write disjoint regions only (documented on each method).
unsafe impl Send for Shared2d {}
// SAFETY: as above.
unsafe impl Sync for Shared2d {}

impl Shared2d {
    /// Wraps a row-major `rows × cols` buffer.
    pub(crate) fn new(data: &mut [f32], rows: usize, cols: usize) -> Shared2d {
        assert!(data.len() >= rows * cols, "buffer smaller than its shape");
        Shared2d {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
        }
    }

    /// Rows `start..end` as one slice.
    ///
    /// # Safety
    /// No other thread may access these rows while the slice lives, and the
    /// buffer passed to [`Shared2d::new`] must outlive it.
    pub(crate) unsafe fn rows_mut<'a>(self, start: usize, end: usize) -> &'a mut [f32] {
        assert!(start <= end && end <= self.rows, "rows out of range");
        // SAFETY: in bounds (checked); exclusivity is the caller's promise.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.add(start * self.cols),
                (end - start) * self.cols,
            )
        }
    }

    /// A pointer to row `row`, column `col`, from which `len` values of
    /// each of the `rows` rows `row..row + rows` are in bounds.
    pub(crate) fn tile_ptr(self, row: usize, rows: usize, col: usize, len: usize) -> *mut f32 {
        assert!(
            row + rows <= self.rows && col + len <= self.cols,
            "tile out of range"
        );
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add(row * self.cols + col) }
    }

    /// `len` values of row `row` from column `col`.
    ///
    /// # Safety
    /// As for [`Shared2d::rows_mut`], for this part of the row.
    pub(crate) unsafe fn part_mut<'a>(self, row: usize, col: usize, len: usize) -> &'a mut [f32] {
        assert!(
            row < self.rows && col + len <= self.cols,
            "part out of range"
        );
        // SAFETY: in bounds (checked); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(row * self.cols + col), len) }
    }
}

/// Calls `f(first_row, rows)` on the threads of `team`, each with its own
/// contiguous share of the rows of `data` (`rows × cols`).
pub(crate) fn for_rows(
    team: &Team,
    data: &mut [f32],
    rows: usize,
    cols: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let shared = Shared2d::new(data, rows, cols);
    team.run(&|t, n| {
        let (start, end) = share(rows, t, n);
        if start < end {
            // SAFETY: `share` gives each thread disjoint rows, and `data`
            // is borrowed for the whole of `team.run`.
            f(start, unsafe { shared.rows_mut(start, end) });
        }
    });
}

/// Values held as half-precision (bit patterns) or single-precision floats.
pub(crate) enum Floats {
    F16(Vec<u16>),
    F32(Vec<f32>),
}

impl Floats {
    /// Bytes the values take.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Floats::F16(v) => v.len() * 2,
            Floats::F32(v) => v.len() * 4,
        }
    }

    /// Fills `out` with the values from index `at` on, as f32.
    pub(crate) fn read(&self, at: usize, out: &mut [f32]) {
        let end = at + out.len();
        match self {
            Floats::F16(v) => {
                for (d, &bits) in out.iter_mut().zip(&v[at..end]) {
                    *d = half::f16::from_bits(bits).to_f32();
                }
            }
            Floats::F32(v) => out.copy_from_slice(&v[at..end]),
        }
    }
}

/// A linear layer `y = x·Wᵀ + b` with `W` packed in panels (module docs).
pub(crate) struct Linear {
    k: usize,
    n: usize,
    panels: Floats,
    /// `b`, zero-padded to whole panels.
    bias: Vec<f32>,
}

impl Linear {
    /// Packs `weight` (`n × k`, row-major: the checkpoint's layout) and
    /// `bias` (`n` values), as half-precision values when `half` is set.
    pub(crate) fn pack(weight: &[f32], bias: &[f32], n: usize, k: usize, half: bool) -> Linear {
        assert_eq!(weight.len(), n * k, "weight shape");
        assert_eq!(bias.len(), n, "bias shape");
        let count = n.div_ceil(NR);
        let value = |p: usize, j: usize, c: usize| {
            let out = j * NR + c;
            if out < n { weight[out * k + p] } else { 0.0 }
        };
        let panels = if half {
            let mut v = Vec::with_capacity(count * k * NR);
            for j in 0..count {
                for p in 0..k {
                    v.extend((0..NR).map(|c| half::f16::from_f32(value(p, j, c)).to_bits()));
                }
            }
            Floats::F16(v)
        } else {
            let mut v = Vec::with_capacity(count * k * NR);
            for j in 0..count {
                for p in 0..k {
                    v.extend((0..NR).map(|c| value(p, j, c)));
                }
            }
            Floats::F32(v)
        };
        let mut padded = bias.to_vec();
        padded.resize(count * NR, 0.0);
        Linear {
            k,
            n,
            panels,
            bias: padded,
        }
    }

    /// Output width.
    pub(crate) fn outputs(&self) -> usize {
        self.n
    }

    /// Bytes the packed weights and bias take.
    pub(crate) fn bytes(&self) -> usize {
        self.panels.bytes() + self.bias.len() * 4
    }

    /// `out = x·Wᵀ + b (+ residual)`, then GELU if `gelu`: `x` is `m × k`,
    /// `out` and `residual` are `m × n`, all row-major. Split by panels
    /// between the threads of `team`.
    pub(crate) fn forward(
        &self,
        team: &Team,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        residual: Option<&[f32]>,
        gelu: bool,
    ) {
        assert!(x.len() >= m * self.k, "input shape");
        assert!(out.len() >= m * self.n, "output shape");
        if let Some(r) = residual {
            assert!(r.len() >= m * self.n, "residual shape");
        }
        if m == 0 {
            return;
        }
        let count = self.n.div_ceil(NR);
        let block = ((ROW_BLOCK_BYTES / (self.k * 4)) / MR * MR).max(MR);
        let out = Shared2d::new(out, m, self.n);
        let simd = avx512_available();
        team.run(&|t, size| {
            let (first, last) = share(count, t, size);
            let mut r0 = 0;
            while r0 < m {
                let r_end = (r0 + block).min(m);
                for j in first..last {
                    let mut r = r0;
                    while r < r_end {
                        let rows = (r_end - r).min(MR);
                        let tile = Tile {
                            x: &x[r * self.k..(r + rows) * self.k],
                            rows,
                            k: self.k,
                            panel: j,
                            cols: (self.n - j * NR).min(NR),
                            bias: &self.bias[j * NR..(j + 1) * NR],
                            residual: residual.map(|res| &res[r * self.n..(r + rows) * self.n]),
                            ld: self.n,
                            gelu,
                        };
                        // Only this thread writes the columns of panel `j`
                        // (panels are shared out disjointly).
                        self.tile(&tile, out, r, simd);
                        r += rows;
                    }
                }
                r0 = r_end;
            }
        });
    }

    /// Computes `tile` into rows `row..row + tile.rows` of `out`, columns
    /// of its panel. The caller must be the only one writing those values.
    fn tile(&self, tile: &Tile<'_>, out: Shared2d, row: usize, simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            let col0 = tile.panel * NR;
            let dst = out.tile_ptr(row, tile.rows, col0, tile.cols);
            // SAFETY: AVX-512F, AVX2, FMA and F16C were detected at run
            // time; `dst` has `cols` values in bounds in each of the tile's
            // rows (row stride `ld`), and no other thread writes them.
            unsafe { avx512::tile(self, tile, dst) };
            return;
        }
        let _ = simd;
        portable_tile(self, tile, out, row);
    }
}

/// One register tile of a product: `rows` input rows against panel `panel`.
struct Tile<'a> {
    x: &'a [f32],
    rows: usize,
    k: usize,
    panel: usize,
    /// Valid output columns of this panel (`NR` but in the last panel).
    cols: usize,
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    /// Row stride of the output and the residual (`n`).
    ld: usize,
    gelu: bool,
}

/// Whether the AVX-512 tile can run on this CPU (AVX-512F with AVX2, FMA and
/// F16C).
pub(crate) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn portable_tile(linear: &Linear, tile: &Tile<'_>, dst: Shared2d, row: usize) {
    let mut acc = [[0f32; NR]; MR];
    for row in acc.iter_mut().take(tile.rows) {
        row.copy_from_slice(tile.bias);
    }
    let base = tile.panel * tile.k * NR;
    let mut w = [0f32; NR];
    for p in 0..tile.k {
        linear.panels.read(base + p * NR, &mut w);
        for (r, row) in acc.iter_mut().enumerate().take(tile.rows) {
            let a = tile.x[r * tile.k + p];
            for (s, &wv) in row.iter_mut().zip(&w) {
                *s += a * wv;
            }
        }
    }
    let col0 = tile.panel * NR;
    for (r, sums) in acc.iter().enumerate().take(tile.rows) {
        // SAFETY: the caller alone writes this panel's columns of these rows.
        let out = unsafe { dst.part_mut(row + r, col0, tile.cols) };
        out.copy_from_slice(&sums[..tile.cols]);
        if let Some(res) = tile.residual {
            for (o, v) in out.iter_mut().zip(&res[r * tile.ld + col0..]) {
                *o += v;
            }
        }
        if tile.gelu {
            gelu(out);
        }
    }
}

/// The float32 rational approximation of erf used by Eigen and XLA (max
/// absolute error 4.5e-7 on [-4, 4]; ±1 beyond), numerator coefficients,
/// as published (more digits than an f32 holds).
#[allow(clippy::excessive_precision)]
const ERF_ALPHA: [f32; 7] = [
    -1.609_603_3e-2,
    -2.954_599_8e-3,
    -7.349_906_3e-4,
    -5.692_506_4e-5,
    -2.101_024e-6,
    2.770_681_4e-8,
    -2.726_142_3e-10,
];
/// Denominator coefficients of the same approximation.
#[allow(clippy::excessive_precision)]
const ERF_BETA: [f32; 5] = [
    -1.426_474e-2,
    -7.373_329_3e-3,
    -1.682_827e-3,
    -2.133_740_6e-4,
    -1.456_607_2e-5,
];

/// erf(x) by the approximation above.
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ERF_ALPHA[6];
    for c in ERF_ALPHA[..6].iter().rev() {
        p = p * x2 + c;
    }
    let mut q = ERF_BETA[4];
    for c in ERF_BETA[..4].iter().rev() {
        q = q * x2 + c;
    }
    x * p / q
}

/// In place: `v = v · Φ(v)`, the exact (erf) GELU.
pub(crate) fn gelu(values: &mut [f32]) {
    for v in values {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ERF_ALPHA, ERF_BETA, Floats, Linear, MR, NR, Tile};

    /// The tile for any row count up to [`MR`], stored from `dst` (row
    /// `0` of the tile, column `0` of its panel; row stride `tile.ld`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX2, FMA and F16C; `tile.cols`
    /// values from `dst` in each of the tile's rows must be writable by
    /// this thread alone.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn tile(linear: &Linear, tile: &Tile<'_>, dst: *mut f32) {
        // SAFETY (all arms): features as required by each body.
        unsafe {
            match tile.rows {
                1 => body::<1>(linear, tile, dst),
                2 => body::<2>(linear, tile, dst),
                3 => body::<3>(linear, tile, dst),
                4 => body::<4>(linear, tile, dst),
                5 => body::<5>(linear, tile, dst),
                6 => body::<6>(linear, tile, dst),
                7 => body::<7>(linear, tile, dst),
                8 => body::<8>(linear, tile, dst),
                9 => body::<9>(linear, tile, dst),
                10 => body::<10>(linear, tile, dst),
                11 => body::<11>(linear, tile, dst),
                _ => body::<MR>(linear, tile, dst),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn mask(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn body<const R: usize>(linear: &Linear, tile: &Tile<'_>, dst: *mut f32) {
        let k = tile.k;
        assert!(tile.x.len() >= R * k && tile.bias.len() == NR && tile.cols <= NR);
        let col0 = tile.panel * NR;
        if let Some(res) = tile.residual {
            assert!(res.len() >= (R - 1) * tile.ld + col0 + tile.cols);
        }
        let m0 = mask(tile.cols);
        let m1 = mask(tile.cols.saturating_sub(16));
        let x = tile.x.as_ptr();
        // SAFETY: every pointer below stays inside the slices asserted
        // above: `x` has `R × k` values, a panel `k × NR`, the residual
        // reaches column `col0 + cols` of row `R - 1`; `dst` is valid for
        // `cols` values of each row (the caller's promise), and masked
        // loads and stores touch only the valid columns.
        unsafe {
            let b0 = _mm512_loadu_ps(tile.bias.as_ptr());
            let b1 = _mm512_loadu_ps(tile.bias.as_ptr().add(16));
            let mut acc0 = [b0; R];
            let mut acc1 = [b1; R];
            match &linear.panels {
                Floats::F16(v) => {
                    assert!(v.len() >= (tile.panel + 1) * k * NR);
                    let w = v.as_ptr().add(tile.panel * k * NR);
                    for p in 0..k {
                        let q = w.add(p * NR);
                        let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(q.cast()));
                        let w1 = _mm512_cvtph_ps(_mm256_loadu_si256(q.add(16).cast()));
                        for r in 0..R {
                            let a = _mm512_set1_ps(*x.add(r * k + p));
                            acc0[r] = _mm512_fmadd_ps(a, w0, acc0[r]);
                            acc1[r] = _mm512_fmadd_ps(a, w1, acc1[r]);
                        }
                    }
                }
                Floats::F32(v) => {
                    assert!(v.len() >= (tile.panel + 1) * k * NR);
                    let w = v.as_ptr().add(tile.panel * k * NR);
                    for p in 0..k {
                        let q = w.add(p * NR);
                        let w0 = _mm512_loadu_ps(q);
                        let w1 = _mm512_loadu_ps(q.add(16));
                        for r in 0..R {
                            let a = _mm512_set1_ps(*x.add(r * k + p));
                            acc0[r] = _mm512_fmadd_ps(a, w0, acc0[r]);
                            acc1[r] = _mm512_fmadd_ps(a, w1, acc1[r]);
                        }
                    }
                }
            }
            for r in 0..R {
                let mut v0 = acc0[r];
                let mut v1 = acc1[r];
                let at = r * tile.ld + col0;
                if let Some(res) = tile.residual {
                    let p = res.as_ptr().add(at);
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
                }
                if tile.gelu {
                    v0 = gelu(v0);
                    v1 = gelu(v1);
                }
                let out = dst.add(r * tile.ld);
                _mm512_mask_storeu_ps(out, m0, v0);
                _mm512_mask_storeu_ps(out.add(16), m1, v1);
            }
        }
    }

    /// GELU of 16 lanes, with the same erf approximation as the portable code.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn gelu(v: __m512) -> __m512 {
        let z = _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
        let z2 = _mm512_mul_ps(z, z);
        let mut p = _mm512_set1_ps(ERF_ALPHA[6]);
        for c in ERF_ALPHA[..6].iter().rev() {
            p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(*c));
        }
        let mut q = _mm512_set1_ps(ERF_BETA[4]);
        for c in ERF_BETA[..4].iter().rev() {
            q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(*c));
        }
        let erf = _mm512_div_ps(_mm512_mul_ps(z, p), q);
        let half = _mm512_mul_ps(v, _mm512_set1_ps(0.5));
        _mm512_fmadd_ps(half, erf, half)
    }
}

/// `len` test values in [-1, 1], a xorshift stream from `seed`.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::test_values as values;
    use super::*;

    fn reference(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = f64::from(b[c]);
                for p in 0..k {
                    s += f64::from(x[r * k + p]) * f64::from(w[c * k + p]);
                }
                out[r * n + c] = s as f32;
            }
        }
        out
    }

    #[test]
    fn products_match_a_plain_loop_for_odd_shapes_and_every_team_size() {
        // Row counts cover every tile height, and the widths a partial last panel.
        for &(m, n, k) in &[(1, 5, 3), (13, 40, 17), (25, 64, 33), (7, 96, 384)] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let b = values(n, 3);
            let res = values(m * n, 4);
            let want = reference(&x, &w, &b, m, n, k);
            for half in [false, true] {
                let linear = Linear::pack(&w, &b, n, k, half);
                for threads in [1, 2, 3] {
                    let team = Team::new(threads, "test").expect("team");
                    let mut out = vec![f32::NAN; m * n];
                    linear.forward(&team, &x, m, &mut out, None, false);
                    let tol = if half {
                        2e-3 * k as f32
                    } else {
                        1e-4 * k as f32
                    };
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() < tol,
                            "{m}x{n}x{k} half={half} t={threads} [{i}] {a} vs {b}"
                        );
                    }
                    let mut fused = vec![0f32; m * n];
                    linear.forward(&team, &x, m, &mut fused, Some(&res), true);
                    for i in 0..m * n {
                        let mut v = [out[i] + res[i]];
                        gelu(&mut v);
                        assert!(
                            (fused[i] - v[0]).abs() < 1e-5,
                            "fused [{i}] {} vs {}",
                            fused[i],
                            v[0]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_tile_agrees_with_the_dispatched_one() {
        let (m, n, k) = (12, 40, 50);
        let x = values(m * k, 5);
        let w = values(n * k, 6);
        let b = values(n, 7);
        let linear = Linear::pack(&w, &b, n, k, true);
        let tile = Tile {
            x: &x,
            rows: m,
            k,
            panel: 1,
            cols: 8,
            bias: &linear.bias[NR..2 * NR],
            residual: None,
            ld: n,
            gelu: true,
        };
        let mut a = vec![0f32; m * n];
        let mut b2 = vec![0f32; m * n];
        linear.tile(&tile, Shared2d::new(&mut a, m, n), 0, avx512_available());
        portable_tile(&linear, &tile, Shared2d::new(&mut b2, m, n), 0);
        for (i, (p, q)) in a.iter().zip(&b2).enumerate() {
            assert!((p - q).abs() < 1e-4, "[{i}] {p} vs {q}");
        }
    }

    #[test]
    fn erf_is_close_to_the_series() {
        // erf(0.5) = 0.520499877813, erf(1) = 0.842700792950, erf(2) = 0.995322265019
        for (x, want) in [
            (0.5f32, 0.520_499_9f32),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (9.0, 1.0),
        ] {
            assert!((erf(x) - want).abs() < 1e-6, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-6);
        }
    }

    #[test]
    fn a_team_runs_every_thread_once_per_operation() {
        let team = Team::new(3, "test").expect("team");
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            team.run(&|t, n| {
                assert_eq!(n, 3);
                hits.fetch_add(1 << (8 * t), Ordering::SeqCst);
            });
            assert_eq!(hits.load(Ordering::SeqCst), 0x01_01_01);
        }
    }
}
