"""The toy world's report (`python eval.py`): the paper's tables in miniature as Markdown, the comparisons they
support stated from the numbers, and one PNG. eval.py runs the fine-tuning; this file only writes it up.
"""
import numpy as np

from evaluation.retrieval import retrieval_table

PERCENT = {"corr", "acc2_nonneg", "f1_nonneg", "acc2_pos", "f1_pos", "acc7", "accuracy", "f1", "precision",
           "recall", "subset_acc", "acc", "mcc", "pearson", "spearman"}


COLUMNS = {  # (header, metric keys joined by "/") per task, in the paper's column order
    "sentiment": [("MAE (lower better)", ("mae",)), ("Corr", ("corr",)), ("Acc-2", ("acc2_nonneg", "acc2_pos")),
                  ("F1", ("f1_nonneg", "f1_pos")), ("Acc-7", ("acc7",))],
    "emotion": [("Acc", ("accuracy",)), ("F1", ("f1",)), ("Precision", ("precision",)), ("Recall", ("recall",))],
    "binary": [("Acc", ("acc",))], "mc": [("Acc", ("acc",))],
}


def fmt(key, ms):
    """(mean, std) -> '84.7+-0.3' (x100 for accuracies, F1, P, R, correlations; 3 decimals for MAE)."""
    m, s = ms
    if key in PERCENT:
        return f"{100 * m:.1f}" + (f"±{100 * s:.1f}" if s else "")
    return f"{m:.3f}" + (f"±{s:.3f}" if s else "")


def metric_cells(task, summary):
    return [" / ".join(fmt(k, summary[k]) for k in keys) for _, keys in COLUMNS[task]]


HEADLINE = {"sentiment": ("corr", "Corr"), "emotion": ("f1", "micro-F1"), "binary": ("acc", "Acc"),
            "mc": ("acc", "Acc")}


def report_markdown(res, args, splits, argv_line):
    n = {s: len(v) for s, v in splits.items()}
    L = ["# i-Code downstream evaluation on the toy world", "",
         f"Command: `{argv_line}` ({res['seconds']:.0f} s, {args.seeds} fine-tuning seed(s) per row"
         f"{', mean±std' if args.seeds > 1 else ''}).", "",
         f"Downstream splits: {n['train']} train / {n['validation']} validation / {n['test']} test clips. "
         f"Pretrained checkpoint (D): `{res['ckpt'] or 'none'}`"
         + (f"; co-attention: `{res['ckpt_co']}`" if res["ckpt_co"] else "") + ". NP = no pretraining (fresh "
         "initialisation of encoders *and* fusion: unlike the paper's NP, whose encoders are pretrained "
         "single-modality models). M / C = merge- / co-attention fusion.", "",
         f"Fine-tuning: up to {args.epochs} epochs, early stopping after {args.patience} epochs without a better "
         f"validation metric, test metrics at the best validation epoch; AdamW, LR {args.lr:g} (fusion + head), "
         + ("encoders frozen (their outputs computed once and cached; `--lr-encoders` > 0 fine-tunes them)"
            if args.lr_encoders == 0 else f"encoders LR {args.lr_encoders:g}") + f", batch {args.batch}.", ""]
    titles = {"sentiment": "Table 1 in miniature: sentiment regression (score in [-3, 3]); Acc-2 and F1 as "
                           "negative/non-negative / negative/positive",
              "emotion": "Table 2 in miniature: multi-label emotion (6 classes); Acc = Jaccard, micro-F1, P, R"}
    for task in ("sentiment", "emotion"):
        L += [f"## {titles[task]}", "", "| model | " + " | ".join(h for h, _ in COLUMNS[task]) + " |",
              "|---|" + "---|" * len(COLUMNS[task])]
        L += [f"| i-Code {name} | " + " | ".join(metric_cells(task, r["test"])) + " |"
              for name, r in res["tables"][task].items()]
        L.append("")
    L += ["## Tables 3-6 in miniature: binary classification (label = score > 0) and multiple choice "
          "(4 candidates; question [SEP] answer [SEP] subtitles)", "", "| model | binary Acc | MC Acc |",
          "|---|---|---|"]
    for name in res["tables"]["binary"]:
        L.append(f"| i-Code {name} | {metric_cells('binary', res['tables']['binary'][name]['test'])[0]} | "
                 f"{metric_cells('mc', res['tables']['mc'][name]['test'])[0]} |")
    L += ["", "## Table 8 in miniature: modality subsets at fine-tuning and test time "
          f"(model {res['subsets_model']})", "",
          "| V | L | S | emotion Acc | F1 | Precision | Recall | sentiment MAE | Corr |",
          "|---|---|---|---|---|---|---|---|---|"]
    for letters, r in res["subsets"]["emotion"].items():
        s = res["subsets"]["sentiment"][letters]["test"]
        marks = " | ".join("X" if k in letters.split("+") else "" for k in "VLS")
        L.append(f"| {marks} | " + " | ".join(metric_cells("emotion", r["test"])) +
                 f" | {fmt('mae', s['mae'])} | {fmt('corr', s['corr'])} |")
    L += ["", "## Zero-shot retrieval (contrastive space, no fine-tuning; held-out clips)", ""]
    for name, r in res["retrieval"].items():
        L += [retrieval_table(r, f"i-Code {name}"), ""]
    L += ["## What the numbers say", ""] + observations(res) + [""]
    return "\n".join(L)


def observations(res):
    """Plain-sentence comparisons the issue asks to state honestly (computed, not hand-written)."""
    out = []
    tabs = res["tables"]
    names = list(tabs["sentiment"])
    pre = [n for n in names if n.startswith("D+")]
    if pre:
        wins = []
        fresh = f"NP+{pre[0][2]}"  # no pretraining, the same fusion mode
        for task, (key, label) in HEADLINE.items():
            a, b = tabs[task][pre[0]]["test"][key][0], tabs[task][fresh]["test"][key][0]
            wins.append(a > b)
            out.append(f"- {task}: {pre[0]} {label} {fmt(key, (a, 0))} vs {fresh} {fmt(key, (b, 0))} "
                       f"({'pretraining helps' if a > b else 'pretraining does NOT help here'}).")
        out.append(f"- Pretraining beats no pretraining on {sum(wins)} of {len(wins)} headline metrics.")
    else:
        out.append("- No pretraining checkpoint: pretrained rows missing (run `python train.py` first).")
    for task in ("emotion", "sentiment"):
        key, label = HEADLINE[task]
        sub = {k: v["test"][key][0] for k, v in res["subsets"][task].items()}
        full, singles = sub["V+L+S"], {k: sub[k] for k in ("V", "L", "S")}
        beaten = [k for k, v in singles.items() if v >= full]
        out.append(f"- {task} {label}: V+L+S {fmt(key, (full, 0))}; single modalities "
                   + ", ".join(f"{k} {fmt(key, (v, 0))}" for k, v in singles.items())
                   + (" -> three modalities beat each single one." if not beaten else
                      f" -> three modalities do NOT beat {', '.join(beaten)}."))
    ret = res["retrieval"]
    if len(ret) > 1:
        r1 = {n: np.mean([v["R@1"] for k, v in r.items() if "->" in k]) for n, r in ret.items()}
        out.append("- Retrieval, mean R@1 over directions: " + ", ".join(f"{n} {100 * v:.1f}" for n, v in r1.items()))
    return out


def plot_report(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    tasks = list(HEADLINE)
    names = list(res["tables"]["sentiment"])
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [100 * res["tables"][t][n]["test"][HEADLINE[t][0]][0] for t in tasks]
        errs = [100 * res["tables"][t][n]["test"][HEADLINE[t][0]][1] for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * w, vals, w, yerr=errs, label=f"i-Code {n}")
    ax.set_xticks(np.arange(len(tasks)) + w * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{t}\n{HEADLINE[t][1]}" for t in tasks])
    ax.set_ylabel("test metric x100")
    ax.set_title("Tables 1-6 in miniature")
    ax.legend(fontsize=8)
    ax = axes[1]
    subsets = list(res["subsets"]["emotion"])
    for i, t in enumerate(("emotion", "sentiment")):
        key = HEADLINE[t][0]
        ax.bar(np.arange(len(subsets)) + i * 0.4, [100 * res["subsets"][t][s]["test"][key][0] for s in subsets], 0.4,
               label=f"{t} {HEADLINE[t][1]}")
    ax.set_xticks(np.arange(len(subsets)) + 0.2)
    ax.set_xticklabels(subsets)
    ax.set_title("Table 8 in miniature: modality subsets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
