"""BLAS settings for the numpy-based peers, applied before numpy is imported.

BLAS reads its thread count when numpy is loaded, so a peer imports this
module first: it applies `--threads N` to OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS. OPENBLAS_CORETYPE pins OpenBLAS to
one CPU's kernels (e.g. "Haswell", AVX2 only) instead of detecting the best
for this CPU; machine images set it for portability, and left in place it
would hold the numpy peers below Strata, llama.cpp and onnxruntime, which
use AVX-512 where the CPU has it. It is dropped unless --keep-blas-coretype
is given (a peer's output reports the core type it ran with).
"""

import os
import sys


def _threads_from_argv(argv):
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


def apply(argv=None):
    """Sets the BLAS environment from the command line (default sys.argv)."""
    argv = sys.argv if argv is None else argv
    threads = _threads_from_argv(argv)
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads
    if "--keep-blas-coretype" not in argv:
        os.environ.pop("OPENBLAS_CORETYPE", None)
