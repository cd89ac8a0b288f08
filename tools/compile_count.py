"""How often torch.compile (Dynamo) compiles the pretraining objective's main graph, the one holding the
encoders, over four batches of one modality set: with text and audio padded to each batch's longest row
(lengths vary) and padded to the data config's maxima (`DataConfig.pad_to_max`, what `train.py --compile`
uses). Dynamo only (no Inductor code generation), tiny preset, on the CPU:

    python -m tools.compile_count
"""
import time

import torch
import torch.nn.functional as F

from icode import ICode, preset
from losses import PAPER_WEIGHTS, count_targets
from tools.benchmark import synthetic_batch
from train import PretrainObjective

torch.manual_seed(0)
model = ICode(preset("tiny"))
objective = PretrainObjective(model, PAPER_WEIGHTS)
main_graphs = []


def backend(gm, example_inputs):
    """Count the graphs that run the speech encoder's convolutions (the main graph), run the rest as traced."""
    if any(n.target in (F.conv2d, torch.conv2d) for n in gm.graph.nodes):
        main_graphs.append(len(gm.graph.nodes))
    return gm.forward


# (text tokens, audio seconds) of four batches: the toy world's maxima are 32 tokens and 2 s
for label, lengths in (("padded to each batch's longest row", [(32, 2.0), (20, 1.5), (27, 1.2), (14, 0.9)]),
                       ("padded to the maxima (pad_to_max)", [(32, 2.0)] * 4)):
    torch._dynamo.reset()
    main_graphs.clear()
    run = torch.compile(objective, backend=backend)
    t = time.time()
    for text_len, seconds in lengths:
        batch = synthetic_batch(model.cfg, 2, text_len, seconds, 4, 64, "cpu")
        targets = model.targets(batch)
        loss, _ = run(batch, targets, count_targets(targets, False), 1)
        loss.backward()
    n = len(main_graphs)
    print(f"{label}: {n} compilation{'s' * (n != 1)} of the main graph ({time.time() - t:.0f} s)")
