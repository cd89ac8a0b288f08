"""GLUE (Table 7): text-only fine-tuning data read from GLUE's TSV files."""
import csv
import os
import sys

# first text column, second (None for single sentences), label column, head outputs, label values in id order
GLUE_SPECS = {
    "CoLA": ("sentence", None, "label", 2, ("0", "1")),           # no header: source, label, author label, sentence
    "SST-2": ("sentence", None, "label", 2, ("0", "1")),
    "MRPC": ("#1 String", "#2 String", "Quality", 2, ("0", "1")),
    "QQP": ("question1", "question2", "is_duplicate", 2, ("0", "1")),
    "STS-B": ("sentence1", "sentence2", "score", 1, None),         # a similarity score in [0, 5]: regression
    "MNLI": ("sentence1", "sentence2", "gold_label", 3, ("contradiction", "entailment", "neutral")),
    "QNLI": ("question", "sentence", "label", 2, ("entailment", "not_entailment")),
    "RTE": ("sentence1", "sentence2", "label", 2, ("entailment", "not_entailment")),
    "WNLI": ("sentence1", "sentence2", "label", 2, ("0", "1")),
}


def read_glue_tsv(path, task):
    """One GLUE TSV (train.tsv / dev.tsv) -> [(text_a, text_b or None, label)], label an id (float for STS-B).
    Rows with a wrong number of columns or an unknown label (a few in QQP) are skipped with a count."""
    a_col, b_col, y_col, _, values = GLUE_SPECS[task]
    rows, bad = [], 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = ["source", "label", "author_label", "sentence"] if task == "CoLA" else next(reader)
        for r in reader:
            if len(r) != len(header):
                bad += 1
                continue
            r = dict(zip(header, r))
            try:
                y = float(r[y_col]) if values is None else values.index(r[y_col])
            except (KeyError, ValueError):
                bad += 1
                continue
            rows.append((r[a_col], r[b_col] if b_col else None, y))
    if bad:
        print(f"eval: skipped {bad} malformed rows of {path}", file=sys.stderr)
    return rows


def load_glue(glue_dir, task, tokenizer, max_len):
    """Splits for fine-tuning: train.tsv; validation and test both dev.tsv (MNLI: dev_matched.tsv), since
    GLUE's test labels are hidden. Numbers are dev-set numbers, selected on dev, as BERT / DeBERTa report."""
    if task not in GLUE_SPECS:
        raise ValueError(f"--glue-task must be one of {sorted(GLUE_SPECS)}, got {task!r}")

    def exs(name):
        return [{"text_ids": tokenizer.encode_one(a, b, max_len=max_len), "label": y, "modalities": ("text",)}
                for a, b, y in read_glue_tsv(os.path.join(glue_dir, name), task)]
    dev = exs("dev_matched.tsv" if task == "MNLI" else "dev.tsv")
    return {"train": exs("train.tsv"), "validation": dev, "test": dev}
