#!/usr/bin/env python3
"""Streaming anomaly-detection peer for Strata's benchmarks: river's Half-Space Trees.

Model (river 0.26.1):
    preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=42)

Data: river's shuttle set (`shuttle.csv.gz`: header f1..f9,anomaly; 9 integer
features, label 1 = anomaly; 49,097 rows of which 3,511 are anomalies), read in
file order as a stream. For each row: score = model.score_one(x), then
model.learn_one(x) (progressive validation: every row is scored before the
model learns from it, the first rows included).

Metrics, over all N streamed scores:
  roc_auc  Mann-Whitney form with average ranks for tied scores:
           (sum of ranks of anomalies - P(P+1)/2) / (P * Q), P anomalies, Q normal rows.
  f1       rate-matched threshold: P = number of true anomalies; t = the P-th
           largest score; a row is flagged iff score >= t (ties at t are all
           flagged, so more than P rows may be flagged). F1 = 2TP / (2TP + FP + FN).
  f1_best  (extra) the best F1 over all thresholds "score >= s", s ranging
           over the distinct scores.
seconds covers only the score/learn loop (CSV parsing excluded); rows_per_s = rows / seconds.

Usage:
  hst_river.py --data shuttle.csv.gz [--rows N] [--scores-out FILE]
prints one JSON line:
  {"peer":"river","rows":N,"roc_auc":A,"f1":F,"f1_threshold_rule":"...","seconds":S,"rows_per_s":X,...}
--scores-out writes "label,score" per row, for checking another implementation's metrics.
"""

import argparse
import csv
import gzip
import json
import sys
import time

F1_RULE = "rate-matched: flag score >= the P-th largest score, P = true anomaly count (ties flagged)"


def read_rows(path, limit=None):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[-1] != "anomaly":
            sys.exit(f"{path}: expected the last column to be 'anomaly', got {header[-1]!r}")
        names = header[:-1]
        rows = []
        for rec in reader:
            if not rec:
                continue
            # river's Shuttle dataset converts every column with int()
            x = {n: int(v) for n, v in zip(names, rec[:-1])}
            rows.append((x, int(rec[-1])))
            if limit is not None and len(rows) >= limit:
                break
    return names, rows


def roc_auc(labels, scores):
    """Mann-Whitney ROC-AUC with average ranks for ties."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    n = len(order)
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2.0 + 1.0  # ranks are 1-based
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)


def f1_at(labels, scores, threshold):
    tp = fp = fn = 0
    for y, s in zip(labels, scores):
        flagged = s >= threshold
        if flagged and y == 1:
            tp += 1
        elif flagged:
            fp += 1
        elif y == 1:
            fn += 1
    denom = 2 * tp + fp + fn
    return (2 * tp / denom if denom else 0.0), tp + fp


def f1_rate_matched(labels, scores):
    pos = sum(labels)
    if pos == 0:
        return 0.0, float("nan"), 0
    threshold = sorted(scores, reverse=True)[pos - 1]
    f1, flagged = f1_at(labels, scores, threshold)
    return f1, threshold, flagged


def f1_best(labels, scores):
    """Best F1 over thresholds 'score >= s' for every distinct s (one sweep)."""
    pos = sum(labels)
    if pos == 0:
        return 0.0, float("nan")
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    best, best_t = 0.0, float("nan")
    tp = fp = 0
    i = 0
    while i < len(pairs):
        s = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == s:
            if pairs[i][1] == 1:
                tp += 1
            else:
                fp += 1
            i += 1
        f1 = 2 * tp / (2 * tp + fp + (pos - tp))
        if f1 > best:
            best, best_t = f1, s
    return best, best_t


def main():
    ap = argparse.ArgumentParser(description="river HalfSpaceTrees peer on the shuttle stream")
    ap.add_argument("--data", required=True, help="shuttle.csv.gz (header f1..f9,anomaly)")
    ap.add_argument("--rows", type=int, help="stream only the first N rows")
    ap.add_argument("--scores-out", help="write label,score per row to this file")
    args = ap.parse_args()

    import river
    from river import anomaly, preprocessing

    _, rows = read_rows(args.data, args.rows)
    model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(
        n_trees=10, height=8, window_size=250, seed=42)

    labels = [y for _, y in rows]
    scores = [0.0] * len(rows)
    t0 = time.perf_counter()
    for i, (x, _) in enumerate(rows):
        scores[i] = model.score_one(x)
        model.learn_one(x)
    seconds = time.perf_counter() - t0

    auc = roc_auc(labels, scores)
    f1, threshold, flagged = f1_rate_matched(labels, scores)
    best, best_t = f1_best(labels, scores)

    if args.scores_out:
        with open(args.scores_out, "w") as f:
            f.write("label,score\n")
            for y, s in zip(labels, scores):
                f.write(f"{y},{s!r}\n")

    print(json.dumps({
        "peer": "river",
        "rows": len(rows),
        "roc_auc": round(auc, 6),
        "f1": round(f1, 6),
        "f1_threshold_rule": F1_RULE,
        "seconds": round(seconds, 6),
        "rows_per_s": round(len(rows) / seconds, 1),
        "anomalies": sum(labels),
        "f1_threshold": threshold,
        "flagged": flagged,
        "f1_best": round(best, 6),
        "f1_best_threshold": best_t,
        "model": "MinMaxScaler | HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=42)",
        "river": river.__version__,
    }))


if __name__ == "__main__":
    main()
