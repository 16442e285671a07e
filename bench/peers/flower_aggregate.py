#!/usr/bin/env python3
"""Federated-aggregation peer for Strata's benchmarks: Flower's server-side aggregation.

One process aggregates one round with one strategy, the way Flower 1.42.0's
server does it, and prints one JSON line. `strata bench fl-aggregate` runs it
once per strategy so that the process's peak memory is that strategy's alone.

Input: a raw little-endian float32 file of N x D values (client after client)
and its JSON sidecar (`clients`, `params`, `weights` = examples per client,
`seed`); --clients K uses the first K clients.

Two of Flower's server APIs, both shipped in flwr 1.42.0:

--api legacy (flwr.server.strategy, the Strategy/FitRes API). Updates are held
  as Flower's strategies hold them after `parameters_to_ndarrays`: a list of
  (list of ndarrays, num_examples), one ndarray per client. The timed call is
  the function the strategy's `aggregate_fit` calls, from
  flwr.server.strategy.aggregate:
    fedavg        aggregate(results)                    FedAvg(inplace=False)
    median        aggregate_median(results)             FedMedian
    trimmed_mean  aggregate_trimmed_avg(results, beta)  FedTrimmedAvg(beta)
    multi_krum    aggregate_krum(results, f, keep)      Krum(num_malicious_clients=f,
                                                             num_clients_to_keep=keep)

--api serverapp (flwr.serverapp.strategy, the Message API that `flwr new`
  projects use in 1.42). Updates are held as the replies' contents: one
  RecordDict per client with an ArrayRecord "arrays" (one Array) and a
  MetricRecord "metrics" with "num-examples". The timed call is the body of
  the strategy's `aggregate_train` after its reply checks:
    fedavg        aggregate_arrayrecords(contents, "num-examples")   FedAvg
    median        np.median(np.stack(layers), axis=0)                 FedMedian (inline there)
    trimmed_mean  trim_mean(np.stack(layers), beta)                   FedTrimmedAvg(beta)
    multi_krum    select_multikrum(contents, f, keep), then
                  aggregate_arrayrecords(selected, "num-examples")   MultiKrum(f, keep)
  (The strategies' `aggregate_train` itself needs Message objects, which
  only exist inside a running Flower app, so the same calls are made here.)

Output, one JSON line:
  {"peer": "flwr", "api": ..., "strategy": ..., "function": ..., "clients": K, "params": D,
   "load_seconds": ..., "seconds": ..., "rss_before_bytes": ..., "peak_rss_bytes": ...,
   "selected": [...] (multi_krum only, ascending client indices), "flwr": ..., "numpy": ...}
seconds covers only the aggregation call; load_seconds reading the file into
Flower's form. peak_rss_bytes is the process's VmHWM (peak resident set)
after the call. --delta-out writes the aggregate as raw little-endian float32.
"""

import argparse
import json
import os
import sys
import time


import blas_env  # noqa: E402  (sets BLAS threads and core type before numpy loads)

blas_env.apply()

import numpy as np  # noqa: E402

STRATEGIES = ("fedavg", "median", "trimmed_mean", "multi_krum")


def memory_status():
    """VmHWM and VmRSS of this process in bytes (Linux), else ru_maxrss."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in out:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def read_clients(path, clients, params):
    """Yields one float32 ndarray per client, each its own allocation, as a
    server holds them after deserialising each client's reply."""
    with open(path, "rb") as f:
        for _ in range(clients):
            row = np.fromfile(f, dtype="<f4", count=params)
            if row.size != params:
                sys.exit(f"{path}: file ends before {clients} clients of {params} values")
            yield row


def blas_core():
    """The kernel family numpy's OpenBLAS chose, or None (best effort)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                    "openblas_get_corename", "scipy_openblas_get_corename"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                name = fn()
                return name.decode() if name else None
    return None


def run_legacy(args, weights):
    from flwr.server.strategy import aggregate as agg

    t0 = time.perf_counter()
    rows = read_clients(args.updates, args.clients, args.params)
    results = [([row], int(w)) for row, w in zip(rows, weights)]
    load = time.perf_counter() - t0
    selected = None
    before = memory_status()
    if args.strategy == "fedavg":
        function = "flwr.server.strategy.aggregate.aggregate"
        t0 = time.perf_counter()
        out = agg.aggregate(results)
        seconds = time.perf_counter() - t0
    elif args.strategy == "median":
        function = "flwr.server.strategy.aggregate.aggregate_median"
        t0 = time.perf_counter()
        out = agg.aggregate_median(results)
        seconds = time.perf_counter() - t0
    elif args.strategy == "trimmed_mean":
        function = "flwr.server.strategy.aggregate.aggregate_trimmed_avg"
        t0 = time.perf_counter()
        out = agg.aggregate_trimmed_avg(results, args.beta)
        seconds = time.perf_counter() - t0
    else:
        function = "flwr.server.strategy.aggregate.aggregate_krum"
        # aggregate_krum returns only the average of the clients it keeps; to
        # report which ones, record the list it hands to the module's
        # `aggregate` (looked up at call time) and pass it on unchanged.
        position = {id(r): i for i, r in enumerate(results)}
        kept = []
        inner = agg.aggregate

        def recording(best_results):
            kept.extend(position[id(r)] for r in best_results)
            return inner(best_results)

        agg.aggregate = recording
        try:
            t0 = time.perf_counter()
            out = agg.aggregate_krum(results, args.byzantine, args.keep)
            seconds = time.perf_counter() - t0
        finally:
            agg.aggregate = inner
        selected = sorted(kept)
    return function, np.asarray(out[0]), load, seconds, before, selected


def run_serverapp(args, weights):
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import strategy_utils
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.multikrum import select_multikrum

    key = "num-examples"
    t0 = time.perf_counter()
    rows = read_clients(args.updates, args.clients, args.params)
    contents = [
        RecordDict({"arrays": ArrayRecord({"0": Array(row)}), "metrics": MetricRecord({key: int(w)})})
        for row, w in zip(rows, weights)
    ]
    load = time.perf_counter() - t0
    selected = None
    before = memory_status()
    if args.strategy == "fedavg":
        function = "flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords"
        t0 = time.perf_counter()
        record = strategy_utils.aggregate_arrayrecords(contents, key)
        seconds = time.perf_counter() - t0
        out = record["0"].numpy()
    elif args.strategy in ("median", "trimmed_mean"):
        t0 = time.perf_counter()
        # As FedMedian / FedTrimmedAvg.aggregate_train: pop each client's
        # layer out of its record, stack, reduce, wrap in an Array.
        layers = [rd["arrays"].pop("0").numpy() for rd in contents]
        if args.strategy == "median":
            function = "flwr.serverapp.strategy.FedMedian (np.median of np.stack)"
            array = Array(np.asarray(np.median(np.stack(layers), axis=0)))
        else:
            function = "flwr.serverapp.strategy.fedtrimmedavg.trim_mean"
            array = Array(np.asarray(trim_mean(np.stack(layers), args.beta)))
        seconds = time.perf_counter() - t0
        out = array.numpy()
    else:
        function = "flwr.serverapp.strategy.multikrum.select_multikrum + aggregate_arrayrecords"
        position = {id(c): i for i, c in enumerate(contents)}
        t0 = time.perf_counter()
        chosen = select_multikrum(contents, num_malicious_nodes=args.byzantine, num_nodes_to_select=args.keep)
        record = strategy_utils.aggregate_arrayrecords(chosen, key)
        seconds = time.perf_counter() - t0
        out = record["0"].numpy()
        selected = sorted(position[id(c)] for c in chosen)
    return function, np.asarray(out), load, seconds, before, selected


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", required=True, help="raw little-endian float32 file, clients x params")
    ap.add_argument("--meta", required=True, help="the file's JSON sidecar (clients, params, weights)")
    ap.add_argument("--clients", type=int, help="use the first K clients (default: all)")
    ap.add_argument("--strategy", required=True, choices=STRATEGIES)
    ap.add_argument("--api", default="legacy", choices=("legacy", "serverapp"))
    ap.add_argument("--beta", type=float, default=0.2, help="trimmed mean: fraction cut at each end")
    ap.add_argument("--byzantine", type=int, default=0, help="multi_krum: f, the malicious clients tolerated")
    ap.add_argument("--keep", type=int, default=0, help="multi_krum: clients kept and averaged")
    ap.add_argument("--delta-out", help="write the aggregate here as raw little-endian float32")
    ap.add_argument("--threads", type=int, help="BLAS threads (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS)")
    ap.add_argument("--keep-blas-coretype", action="store_true",
                    help="honour OPENBLAS_CORETYPE from the environment")
    args = ap.parse_args()

    with open(args.meta) as f:
        meta = json.load(f)
    args.params = int(meta["params"])
    total = int(meta["clients"])
    args.clients = total if args.clients is None else args.clients
    if not 0 < args.clients <= total:
        sys.exit(f"--clients must be in 1..={total}")
    expected = total * args.params * 4
    size = os.path.getsize(args.updates)
    if size != expected:
        sys.exit(f"{args.updates} has {size} bytes, the sidecar says {expected}")
    weights = meta["weights"][: args.clients]
    if args.strategy == "multi_krum" and args.keep <= 0:
        sys.exit("multi_krum needs --keep > 0 (Krum with one client is not compared)")

    runner = run_legacy if args.api == "legacy" else run_serverapp
    function, delta, load, seconds, before, selected = runner(args, weights)
    peak = memory_status()["VmHWM"]
    if args.delta_out:
        np.ascontiguousarray(delta, dtype="<f4").tofile(args.delta_out)

    import flwr

    result = {
        "peer": "flwr",
        "api": args.api,
        "strategy": args.strategy,
        "function": function,
        "clients": args.clients,
        "params": args.params,
        "load_seconds": round(load, 6),
        "seconds": round(seconds, 6),
        "rss_before_bytes": before.get("VmRSS"),
        "peak_rss_bytes": peak,
        "delta_dtype": str(delta.dtype),
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "blas_core": blas_core(),
    }
    if args.strategy == "trimmed_mean":
        result["beta"] = args.beta
    if selected is not None:
        result.update(byzantine=args.byzantine, keep=args.keep, selected=selected)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
