"""The toy world's report (`python eval.py`): Tables 1-2 and 8 in miniature as Markdown, the paper's claims checked
against the numbers, and one PNG. eval.py runs the pretraining rows and the fine-tuning; this file writes them up.

Every verdict is computed (`verdict`): a comparison of two means over n fine-tuning seeds "holds" when the
difference in the claimed direction exceeds two standard errors of the difference, "does not hold" when it exceeds
them the other way, and is "inconclusive" in between. A claim over several comparisons holds when all of them do,
does not hold when any does not, and is inconclusive otherwise.
"""
import math

import numpy as np

from evaluation.retrieval import mean_recall

PERCENT = {"corr", "acc2_nonneg", "f1_nonneg", "acc2_pos", "f1_pos", "acc7", "accuracy", "f1", "precision",
           "recall", "subset_acc", "acc", "mcc", "pearson", "spearman"}

COLUMNS = {  # (header, metric keys joined by "/") per task, in the paper's column order
    "sentiment": [("MAE (lower better)", ("mae",)), ("Corr", ("corr",)), ("Acc-2", ("acc2_nonneg", "acc2_pos")),
                  ("F1", ("f1_nonneg", "f1_pos")), ("Acc-7", ("acc7",))],
    "emotion": [("micro-F1", ("f1",)), ("Acc", ("accuracy",)), ("Precision", ("precision",)),
                ("Recall", ("recall",))],
    "binary": [("Acc", ("acc",))], "mc": [("Acc", ("acc",))],
}
HEADLINE = {  # the metric each claim is judged on: (key, label, lower is better)
    "sentiment": ("mae", "MAE", True), "emotion": ("f1", "micro-F1", False), "binary": ("acc", "Acc", False),
    "mc": ("acc", "Acc", False)}
CHANCE = {"binary": 0.5, "mc": 0.25}   # accuracy of guessing (binary: balanced labels; mc: 4 candidates)


def fmt(key, ms, always=False):
    """(mean, std) -> '84.7±0.3' (x100 for accuracies, F1, P, R, correlations; 3 decimals for MAE); a zero std
    is left out unless `always` (several seeds that agree)."""
    m, s = ms
    if key in PERCENT:
        return f"{100 * m:.1f}" + (f"±{100 * s:.1f}" if s or always else "")
    return f"{m:.3f}" + (f"±{s:.3f}" if s or always else "")


def verdict(a, b, n, lower=False):
    """Does a beat b? a, b: (mean, std) over n seeds each; lower: smaller is better.
    Returns (difference in the claimed direction, its standard error sqrt((s_a^2 + s_b^2) / n), verdict): "holds"
    when the difference exceeds two standard errors, "does not hold" when it is below minus two, else
    "inconclusive" (also for a zero difference with zero spread)."""
    d = (b[0] - a[0]) if lower else (a[0] - b[0])
    se = math.sqrt((a[1] ** 2 + b[1] ** 2) / n)
    if d > 2 * se and d > 0:
        return d, se, "holds"
    if d < -2 * se and d < 0:
        return d, se, "does not hold"
    return d, se, "inconclusive"


def combine(verdicts):
    """All hold -> "holds"; any does not -> "does not hold"; otherwise "inconclusive"."""
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"


def _claim(where, text, task, pairs, table, n):
    """pairs: [(winner, loser)] row names of `table` ({name: {"test": {metric: (mean, std)}}}) on task's headline."""
    key, label, lower = HEADLINE[task]
    parts, vs = [], []
    for a, b in pairs:
        x, y = table[a]["test"][key], table[b]["test"][key]
        d, se, v = verdict(x, y, n, lower)
        scale = 100 if key in PERCENT else 1
        parts.append(f"{a} {fmt(key, x, n > 1)} vs {b} {fmt(key, y, n > 1)} (diff {scale * d:+.{1 if scale == 100 else 3}f}, "
                     f"2 s.e. {scale * 2 * se:.{1 if scale == 100 else 3}f})")
        vs.append(v)
    return {"where": where, "claim": text, "task": task, "metric": label, "evidence": "; ".join(parts),
            "verdict": combine(vs)}


def paper_claims(res):
    """The paper's statements about Tables 1-3 and 8 and section 6, each checked on the toy world's numbers.
    Returns [{"where", "claim", "task", "metric", "evidence", "verdict"}]."""
    t, sub, n = res["tables"], res["subsets"], res["seeds"]
    out = [_claim("Section 6", "pretraining the fusion (D+M, V+M) beats no pretraining (NP+M)", task,
                  [("D+M", "NP+M"), ("V+M", "NP+M")], t[task], n) for task in ("sentiment", "emotion", "binary", "mc")]
    out += [_claim("Table 1", "dual-modality data beats videos (D+M vs V+M)", "sentiment", [("D+M", "V+M")],
                   t["sentiment"], n),
            _claim("Table 1", "merge-attention beats co-attention (D+M vs D+C)", "sentiment", [("D+M", "D+C")],
                   t["sentiment"], n),
            _claim("Table 2", "co-attention beats merge-attention (D+C vs D+M)", "emotion", [("D+C", "D+M")],
                   t["emotion"], n),
            _claim("Table 2", "dual and video data together beat either alone", "emotion",
                   [("D+V+M", "D+M"), ("D+V+M", "V+M")], t["emotion"], n),
            _claim("Table 3", "video pretraining is best (V+M vs every other row)", "binary",
                   [("V+M", r) for r in t["binary"] if r != "V+M"], t["binary"], n),
            _claim("Table 8", "speech is the most effective single modality", "emotion", [("S", "V"), ("S", "L")],
                   sub["emotion"], n),
            _claim("Table 8", "two modalities beat each of their single ones", "emotion",
                   [("V+L", "V"), ("V+L", "L"), ("V+S", "V"), ("V+S", "S"), ("L+S", "L"), ("L+S", "S")],
                   sub["emotion"], n),
            _claim("Table 8", "language-speech is the best pair", "emotion", [("L+S", "V+L"), ("L+S", "V+S")],
                   sub["emotion"], n)]
    return out


def toy_checks(res):
    """What the toy world is built to show (not claims of the paper): labels that need all three modalities are
    best predicted from all three, and every task is learnable (some row clearly above chance)."""
    n, out = res["seeds"], []
    for task, table in res["subsets"].items():
        out.append(_claim("toy world", "all three modalities beat every pair (the labels need all three)", task,
                          [("V+L+S", p) for p in ("V+L", "V+S", "L+S")], table, n))
    for task, p in CHANCE.items():
        key, label, _ = HEADLINE[task]
        best = max(res["tables"][task], key=lambda r: res["tables"][task][r]["test"][key][0])
        x = res["tables"][task][best]["test"][key]
        d, se, v = verdict(x, (p, 0.0), n)
        out.append({"where": "toy world", "claim": f"the best row is above chance ({100 * p:.0f}%)", "task": task,
                    "metric": label, "evidence": f"{best} {fmt(key, x, n > 1)} (2 s.e. {200 * se:.1f})", "verdict": v})
    return out


def metric_cells(task, summary, always=False):
    return [" / ".join(fmt(k, summary[k], always) for k in keys) for _, keys in COLUMNS[task]]


def _table(task, rows, name_cells, header):
    L = ["| " + " | ".join(header + [h for h, _ in COLUMNS[task]]) + " |",
         "|" + "---|" * (len(header) + len(COLUMNS[task]))]
    L += ["| " + " | ".join(name_cells(name) + metric_cells(task, r["test"], len(r["runs"]) > 1)) + " |"
          for name, r in rows.items()]
    return L


def report_markdown(res, args, splits, argv_line):
    n = {s: len(v) for s, v in splits.items()}
    enc = res["encoders"]
    L = ["# i-Code on the toy world: Tables 1-2 and 8 in miniature", "",
         f"Command: `{argv_line}` ({res['seconds']:.0f} s). Every cell is the mean ± std over {res['seeds']} "
         f"fine-tuning seeds (appendix A.2 reports 5) on {n['train']} train / {n['validation']} validation / "
         f"{n['test']} test clips, at the epoch with the best validation metric.", "",
         "Rows, named as in the paper (section 5.1): the fusion network pretrained on the dual-modality sources "
         "(D: image-text, speech-text, video-speech), on the V+L+S videos (V) or both (D+V; `python train.py`'s "
         f"run), for {res['steps']} steps each, with merge- (M) or co-attention (C); NP+M leaves the fusion "
         "unpretrained. " + (f"Every row starts from the same single-modality encoders (`{enc['text']}`, "
                             f"`{enc['vision']}`, `{enc['speech']}`), as the paper's start from public checkpoints."
                             if enc else "The main run started from fresh encoders (no stage one), so NP+M is a "
                             "fresh model."), "",
         f"Fine-tuning: up to {args.epochs} epochs, early stopping after {args.patience} without a better validation "
         f"metric; AdamW, LR {args.lr:g} (fusion + head), " +
         ("encoders frozen (their outputs computed once and cached)" if args.lr_encoders == 0 else
          f"encoders LR {args.lr_encoders:g}") + f", batch {args.batch}.", ""]
    titles = {"sentiment": "Table 1 in miniature: sentiment (score in [-3, 3]; Acc-2 and F1 as negative / "
                           "non-negative and negative / positive)",
              "emotion": "Table 2 in miniature: emotion (6 classes, multi-label; Acc = Jaccard)",
              "binary": "Table 3 in miniature: binary (score > 0; chance 50%)",
              "mc": "Tables 5-6 in miniature: multiple choice (the shape's colour among 4, seen only in the "
                    "frames; chance 25%)"}
    for task in ("sentiment", "emotion", "binary", "mc"):
        L += [f"## {titles[task]}", ""] + _table(task, res["tables"][task], lambda r: [f"i-Code {r}"], ["model"])
        L.append("")
    L += [f"## Table 8 in miniature: modality subsets (i-Code {res.get('subset_row', 'D+M')}, fine-tuned and "
          "tested on the subset)", ""]
    for task, rows in res["subsets"].items():
        L += [f"{task}:", ""] + _table(task, rows, lambda s: ["X" if k in s.split("+") else "" for k in "VLS"],
                                        ["V", "L", "S"]) + [""]
    L += ["## The paper's claims, checked here", "",
          "A comparison holds when the difference exceeds two standard errors of the difference over the seeds, "
          "does not hold when it is that far the other way, and is inconclusive in between.", "",
          "| where | claim | task (metric) | numbers | verdict |", "|---|---|---|---|---|"]
    for c in paper_claims(res) + toy_checks(res):
        L.append(f"| {c['where']} | {c['claim']} | {c['task']} ({c['metric']}) | {c['evidence']} | "
                 f"**{c['verdict']}** |")
    L += ["", "## Zero-shot retrieval on the held-out clips (contrastive space, no fine-tuning)", ""]
    L += retrieval_rows(res["retrieval"], res["ceiling"])
    return "\n".join(L)


def retrieval_rows(results, limit, ks=("R@1", "R@5")):
    """Markdown: one table per K, a row per model ({row: `zero_shot_retrieval` result}) and the ceiling's."""
    first = next(iter(results.values()))
    dirs = [k for k in first if "->" in k]
    L = [f"{first['n']} clips (chance R@1 {100 / first['n']:.1f}). Ceiling: the best any model can reach when clips "
         "with the same description are indistinguishable (video shows only colour, shape and motion).", ""]
    for k in ks:
        L += [f"| {k} | " + " | ".join(dirs) + " | mean |", "|---|" + "---|" * (len(dirs) + 1)]
        for name, r in list(results.items()) + [("ceiling", limit)]:
            L.append(f"| {'i-Code ' + name if name != 'ceiling' else name} | "
                     + " | ".join(f"{100 * r[d][k]:.1f}" for d in dirs)
                     + f" | {100 * mean_recall({d: r[d] for d in dirs}, k):.1f} |")
        L.append("")
    return L


def plot_report(res, path):
    """One figure: Tables 1-3 and 5-6's headline metric per row, Table 8's per subset (error bars: std over
    seeds), and the retrieval R@5 of each pretrained row per direction against the ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    tasks = list(HEADLINE)
    rows = list(res["tables"]["sentiment"])

    def value(r, task):   # higher is better everywhere on the plot: MAE becomes 1 - MAE
        m, s = r["test"][HEADLINE[task][0]]
        return (1 - m if HEADLINE[task][2] else m) * 100, s * 100

    ax, w = axes[0], 0.8 / len(rows)
    for i, row in enumerate(rows):
        v = [value(res["tables"][t][row], t) for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * w, [x for x, _ in v], w, yerr=[e for _, e in v], capsize=2,
               label=f"i-Code {row}")
    for j, t in enumerate(tasks):
        if t in CHANCE:
            ax.hlines(100 * CHANCE[t], j - w / 2, j + w * (len(rows) - 0.5), colors="k", linestyles=":")
    ax.set_xticks(np.arange(len(tasks)) + w * (len(rows) - 1) / 2)
    ax.set_xticklabels([f"{t}\n{'1 - MAE' if HEADLINE[t][2] else HEADLINE[t][1]}" for t in tasks])
    ax.set_ylabel("test metric x100 (dotted: chance)")
    ax.set_title("Tables 1-3, 5-6 in miniature (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax = axes[1]
    subsets = list(next(iter(res["subsets"].values())))
    w = 0.8 / len(res["subsets"])
    for i, (t, table) in enumerate(res["subsets"].items()):
        v = [value(table[s], t) for s in subsets]
        ax.bar(np.arange(len(subsets)) + i * w, [x for x, _ in v], w, yerr=[e for _, e in v], capsize=2,
               label=f"{t} {'1 - MAE' if HEADLINE[t][2] else HEADLINE[t][1]}")
    ax.set_xticks(np.arange(len(subsets)) + w * (len(res["subsets"]) - 1) / 2)
    ax.set_xticklabels(subsets)
    ax.set_title(f"Table 8 in miniature: modality subsets (i-Code {res.get('subset_row', 'D+M')})")
    ax.legend(fontsize=8)
    ax = axes[2]
    dirs = [k for k in res["ceiling"] if any(k in r for r in res["retrieval"].values())]
    w = 0.8 / (len(res["retrieval"]) + 1)
    for i, (row, r) in enumerate(res["retrieval"].items()):
        ax.bar(np.arange(len(dirs)) + i * w, [100 * r[k]["R@5"] for k in dirs], w,
               label=f"i-Code {row} (mean {100 * mean_recall(r):.0f})")
    ax.bar(np.arange(len(dirs)) + len(res["retrieval"]) * w, [100 * res["ceiling"][k]["R@5"] for k in dirs], w,
           color="lightgrey", label="ceiling")
    ax.set_xticks(np.arange(len(dirs)) + w * len(res["retrieval"]) / 2)
    ax.set_xticklabels([k.replace("->", "\n->") for k in dirs], fontsize=8)
    ax.set_ylabel("R@5 x100")
    ax.set_ylim(0, 135)
    ax.set_title("Zero-shot retrieval, held-out clips")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
