"""Checks and configs shared by several test files (imported as `from common import ...`: pytest puts tests/ on the path)."""
import dataclasses

import torch

from icode import preset


def assert_attention_dropout_only_in_training(model, run, rate_attr, where=slice(None)):
    """`model` has attention-probability dropout and no other: run(model) -> output. In training the dropout
    changes output[where]; in eval the output is that of the network with the rate (`rate_attr` on every
    submodule that has it) set to 0, in training mode too."""
    with torch.no_grad():
        ref = run(model.eval())
        train = run(model.train())
        assert not torch.allclose(train[where], ref[where], atol=1e-3)
        modules = [m for m in model.modules() if isinstance(getattr(m, rate_attr, None), float)]
        assert modules and all(getattr(m, rate_attr) > 0 for m in modules)
        for m in modules:
            setattr(m, rate_attr, 0.0)
        torch.testing.assert_close(run(model.train()), ref)


def with_dropout(name, *a, dropout=0.1, **k):
    """icode.preset with every dropout and stochastic depth the paper preset has (attention, hidden and
    activation dropout in the encoders and the fusion network, Swin's drop path) at `dropout`; the tiny
    preset has none, so tests of what restoring an RNG state buys turn them on."""
    cfg = preset(name, *a, **k)
    r = dataclasses.replace
    cfg.text = r(cfg.text, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    cfg.speech = r(cfg.speech, hidden_dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    cfg.vision = r(cfg.vision, drop_path_rate=dropout)
    cfg.fusion = r(cfg.fusion, dropout=dropout)
    return cfg
