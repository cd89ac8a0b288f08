"""The paper's metrics (sections 5-6, appendix A.2) as pure functions on numpy arrays, each checked by hand in
tests/test_metrics.py. No NaN on degenerate inputs: every 0/0 is defined in the function's docstring.

Every metric returns a fraction in [0, 1] (or the raw value for MAE / correlations); the report prints
accuracies, F1, P, R and correlations x100 as the paper's tables do.
"""
import math

import numpy as np
import torch


def _vec(x, name):
    """array-like or tensor -> float64 1-D numpy array; non-finite values are an error, not a NaN metric."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} non-finite value(s)")
    return a


def _pair(pred, target):
    p, t = _vec(pred, "pred"), _vec(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} values but target {t.size}")
    return p, t


def _div(a, b):
    """a / b, and 0.0 when b == 0 (sklearn's zero_division=0, without the warning)."""
    return float(a) / float(b) if b else 0.0


def accuracy(pred, target):
    """Share of positions where pred == target. Empty input -> 0.0."""
    p, t = _pair(pred, target)
    return _div(np.sum(p == t), p.size)


def pearson(x, y):
    """Pearson correlation r = cov(x, y) / (std x * std y). A constant x or y (zero variance) -> 0.0
    (scipy returns NaN with a warning; a constant predictor carries no correlation)."""
    x, y = _pair(x, y)
    if x.size < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.clip(np.sum(dx * dy) / den, -1.0, 1.0)) if den > 0 else 0.0


def rankdata(x):
    """Ranks 1..n, ties given the mean of the ranks they span (scipy.stats.rankdata 'average')."""
    x = _vec(x, "x")
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1          # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman's rho: Pearson correlation of the average ranks (ties share their mean rank)."""
    x, y = _pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def binary_prf(pred, target, positive=1):
    """Precision, recall, F1 of the `positive` class: P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R).
    Each 0/0 is 0.0 (a class never predicted has P = 0, hence F1 = 0). Returns (P, R, F1)."""
    p, t = _pair(pred, target)
    tp = np.sum((p == positive) & (t == positive))
    fp = np.sum((p == positive) & (t != positive))
    fn = np.sum((p != positive) & (t == positive))
    prec, rec = _div(tp, tp + fp), _div(tp, tp + fn)
    return prec, rec, _div(2 * prec * rec, prec + rec)


def weighted_f1(pred, target):
    """Support-weighted mean of the per-class F1 over the classes in `target`:
    F1_w = sum_c (n_c / n) F1_c, n_c = #{target == c}. This is sklearn's f1_score(y_true, y_pred,
    average='weighted'), the form in Self-MM's evaluation code for MOSEI's binary sentiment (Table 1's F1).
    Code that hands sklearn the predictions first weighs by the predicted classes' support instead and can
    print another number for the same predictions.
    A class that only appears in `pred` has weight 0. Empty input -> 0.0."""
    p, t = _pair(pred, target)
    return float(sum(_div(np.sum(t == c), t.size) * binary_prf(p, t, positive=c)[2] for c in np.unique(t)))


def matthews_corrcoef(pred, target):
    """Matthews correlation (CoLA's metric), the multi-class form of Gorodkin (2004) that sklearn uses:
    MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), c = #correct, s = #samples, t_k, p_k the true and
    predicted counts of class k; for two classes it is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    A zero denominator (one class only in pred or target) -> 0.0."""
    p, t = _pair(pred, target)
    classes = np.union1d(p, t)
    tk = np.array([np.sum(t == k) for k in classes], dtype=np.float64)
    pk = np.array([np.sum(p == k) for k in classes], dtype=np.float64)
    c, s = float(np.sum(p == t)), float(p.size)
    den = math.sqrt((s * s - pk @ pk) * (s * s - tk @ tk))
    return (c * s - tk @ pk) / den if den > 0 else 0.0


def regression_metrics(pred, target):
    """CMU-MOSEI sentiment (Tables 1, 9), in the conventions of MulT's / Self-MM's evaluation code.

    pred, target: [N] sentiment scores; target in [-3, 3].
      mae            mean |pred - target|
      corr           Pearson correlation (0.0 for a constant prediction)
      acc2_nonneg    Acc-2, negative vs non-negative: (pred >= 0) == (target >= 0) over all N
                     (left of "/" in Table 1)
      f1_nonneg      weighted F1 of the same two classes
      acc2_pos       Acc-2, negative vs positive excluding zeros: over the rows with target != 0,
                     (pred > 0) == (target > 0) (right of "/" in Table 1; a prediction of exactly 0 counts
                     as negative, as in the reference code). No non-zero target -> 0.0.
      f1_pos         weighted F1 of the same
      acc7           both clipped to [-3, 3] and rounded to the nearest integer (numpy's round half to even,
                     as the reference code), then accuracy over the 7 classes -3..3
    """
    p, t = _pair(pred, target)
    nz = t != 0
    return {
        "mae": float(np.mean(np.abs(p - t))) if p.size else 0.0,
        "corr": pearson(p, t),
        "acc2_nonneg": accuracy(p >= 0, t >= 0),
        "f1_nonneg": weighted_f1(p >= 0, t >= 0),
        "acc2_pos": accuracy(p[nz] > 0, t[nz] > 0),
        "f1_pos": weighted_f1(p[nz] > 0, t[nz] > 0),
        "acc7": accuracy(np.round(np.clip(p, -3, 3)), np.round(np.clip(t, -3, 3))),
    }


def multilabel_metrics(pred, target):
    """CMU-MOSEI emotion recognition (Tables 2, 8, 10). pred, target: [N, C] 0/1 (C = 6 Ekman classes).

    With Y_i the true and Z_i the predicted label set of sample i, and TP, FP, FN summed over all N x C
    cells (micro-averaging):
      accuracy   (1/N) sum_i |Y_i n Z_i| / |Y_i u Z_i|, the example-based multi-label accuracy (Jaccard
                 index; Godbole & Sarawagi 2004, Zhang & Zhou 2014 "A review on multi-label learning
                 algorithms" eq. for Accuracy_exam). This is the "Acc." of the MOSEI emotion baselines
                 (Zhang et al. 2020 MMS2S, HHMPN, TAILOR); it is not the exact-match "subset accuracy".
                 A sample with Y_i and Z_i both empty counts 0, as the baselines' evaluation code does
                 (it clamps |Y_i u Z_i| to 1). Reported here too: `subset_acc` (Y_i == Z_i exactly).
      precision  TP / (TP + FP)            (0.0 when nothing is predicted)
      recall     TP / (TP + FN)            (0.0 when no label is true)
      f1         micro-F1 = 2 P R / (P + R) = 2 TP / (2 TP + FP + FN)   (0.0 when P + R = 0)
    """
    p = _vec(pred, "pred") > 0.5
    t = _vec(target, "target") > 0.5
    ps, ts = np.shape(pred), np.shape(target)
    if tuple(ps) != tuple(ts) or len(ps) != 2:
        raise ValueError(f"pred {tuple(ps)} and target {tuple(ts)} must both be [N, C]")
    p, t = p.reshape(ps), t.reshape(ts)
    inter, union = np.sum(p & t, axis=1), np.sum(p | t, axis=1)
    tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
    prec, rec = _div(tp, tp + fp), _div(tp, tp + fn)
    return {"accuracy": _div(np.sum(inter / np.maximum(union, 1)), len(p)),
            "f1": _div(2 * prec * rec, prec + rec), "precision": prec, "recall": rec,
            "subset_acc": _div(np.sum(np.all(p == t, axis=1)), len(p))}


def retrieval_recall(sim, ks=(1, 5, 10)):
    """Recall@K of a similarity matrix whose row i's one positive is column i (queries x gallery).

    sim: [N, N]. The rank of row i's positive is the number of *other* columns j with sim[i, j] >= sim[i, i]:
    ties are counted pessimistically (a tied negative is placed ahead of the positive), so a constant
    similarity matrix scores R@K = 0 for every K < N: a collapsed representation cannot look good.
    R@K = share of rows whose positive has rank < K. Returns {"R@K": fraction} (K >= N gives 1.0).
    The other direction is `retrieval_recall(sim.T)`.
    """
    s = sim.detach().cpu().double().numpy() if torch.is_tensor(sim) else np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sim must be square [N, N], got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("sim contains non-finite values")
    pos = np.diag(s)[:, None]
    rank = np.sum(s >= pos, axis=1) - 1                   # other columns at least as similar as the positive
    return {f"R@{k}": _div(np.sum(rank < k), len(s)) for k in ks}


# GLUE's standard metric per task (Wang et al. 2018, Table 1 of the GLUE paper; Table 7 here):
# Matthews for CoLA, Pearson and Spearman for STS-B, F1 and accuracy for MRPC and QQP, accuracy elsewhere.
GLUE_METRICS = {"CoLA": ("mcc",), "SST-2": ("acc",), "MRPC": ("f1", "acc"), "QQP": ("f1", "acc"),
                "STS-B": ("pearson", "spearman"), "MNLI": ("acc",), "QNLI": ("acc",), "RTE": ("acc",),
                "WNLI": ("acc",)}


def glue_metrics(task, pred, target):
    """GLUE's metric(s) for `task`: pred/target are class ids (scores for STS-B). F1 is of class 1
    ("equivalent" / "duplicate"), as GLUE's evaluation does. Returns {name: value}."""
    if task not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_METRICS)}")
    fns = {"mcc": matthews_corrcoef, "acc": accuracy, "f1": lambda p, t: binary_prf(p, t, positive=1)[2],
           "pearson": pearson, "spearman": spearman}
    return {m: fns[m](pred, target) for m in GLUE_METRICS[task]}
