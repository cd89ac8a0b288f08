"""What eval.py needs that is not fine-tuning itself:

    metrics.py    the paper's metrics (MAE, Corr, Acc-2, Acc-7, F1, micro-F1, Matthews, R@K), pure functions
    retrieval.py  zero-shot cross-modal retrieval from the contrastive space
    glue.py       GLUE's TSV files (Table 7)
    rows.py       the toy report's rows (section 5.1): D / V / D+V x merge / co-attention, pretrained by train.py
    report.py     the toy world's report: Markdown tables, the comparisons they support, a plot
"""
