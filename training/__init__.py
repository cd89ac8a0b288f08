"""What the training job needs that is not the paper (train.py holds the paper's step):

    distributed.py  torchrun detection, DDP
    checkpoint.py   checkpoint folders: save, list, restore
    speed.py        bf16, torch.compile, activation checkpointing, FLOP counts (docs/speed.md)
    static_rows.py  fixed-size masked-position selection for CUDA graphs
"""
