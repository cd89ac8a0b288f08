"""The toy world's single-modality checkpoints: the stand-ins for the public ones the paper starts from.

Section 4.1: i-Code does not train its encoders from scratch; it starts from DeBERTa-V3, WavLM and a Swin, each
pretrained by its authors on its own modality, and pretrains the fusion on top. The toy world has the same two
stages. Here, stage one: each tiny encoder is pretrained on its own modality's data alone, with that modality's
masked-unit objective on its own outputs (MLM on text, MVM on frames, MSM on speech, section 4.2.1; a head on
the encoder, no fusion network, no contrastive loss), then written as a folder in its public layout
(`config.json` + `model.safetensors`, `model.save_encoder`). `python train.py` then loads the folders through
`model.load_encoder`, exactly the path a real run takes with `--text-encoder` / `--speech-encoder` /
`--vision-encoder`.

The three encoders train in one loop over the toy world's four sources: each batch feeds each of its
modalities to that modality's encoder alone, so the encoders never meet (the sum of their losses has
independent gradients).
"""
import os
import time

import torch
import torch.nn as nn

import data as D
from icode import ICode
from losses import masked_unit_loss
from model import save_encoder
from model.heads import MLMHead, MSMHead, MVMHead

FOLDERS = {"text": ("text", "deberta-v3"), "video": ("vision", "video-swin"), "audio": ("speech", "wavlm")}


def encoder_folders(root):
    """The layout stage one writes: root/{text,vision,speech} -> {"text", "vision", "speech"}: folder (the keys of
    train.py's --text-encoder, --vision-encoder, --speech-encoder)."""
    return {attr: os.path.join(root, attr) for attr, _ in FOLDERS.values()}


class SingleModalityPretraining(nn.Module):
    """An ICode's three encoders, each with its masked-unit head on its own outputs (widths C_l, C_v, C_s)."""

    def __init__(self, icode):
        super().__init__()
        self.icode, cfg = icode, icode.cfg
        self.heads = nn.ModuleDict({
            "text": MLMHead(icode.text.hidden_size, cfg.text.vocab_size),
            "video": MVMHead(icode.vision.hidden_size, cfg.video_codebook),
            "audio": MSMHead(icode.speech.hidden_size, groups=cfg.speech_groups, vars=cfg.speech_vars)})

    def forward(self, batch):
        """{modality: masked-unit loss} for the modalities of the batch: masked inputs through their encoders,
        each encoder's outputs through its own head (section 4.2.1's objectives, no fusion)."""
        targets = self.icode.targets(batch)
        feats, _ = self.icode.pretrain_features(batch, masked=True)
        return {m: masked_unit_loss(*self.heads[m](feats[m], targets[m])) for m in feats}

    def parameters_to_train(self):
        """The encoders and the heads (not the fusion network, which this stage never runs)."""
        return [p for mod in (self.icode.text, self.icode.vision, self.icode.speech, self.heads)
                for p in mod.parameters() if p.requires_grad]


def pretrain_encoders(cfg, manifests, tokenizer, dcfg, out_dir, steps, batch=16, lr=3e-4, warmup=20, seed=0,
                      log=print):
    """Stage one on `manifests` (the toy world's sources): `steps` AdamW steps of `batch` examples, then the
    encoders written to out_dir/{text,vision,speech} in their public layouts. Returns those three folders."""
    torch.manual_seed(seed)
    model = SingleModalityPretraining(ICode(cfg)).train()
    params = model.parameters_to_train()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    loader = D.make_loader(manifests, [1.0] * len(manifests), dcfg, tokenizer, batch_size=batch, seed=seed,
                           num_workers=min(2, os.cpu_count() or 1))
    from tqdm import tqdm
    t0, it, means = time.time(), iter(loader), {}
    with tqdm(total=steps, desc="encoders", dynamic_ncols=True) as bar:
        for step in range(steps):
            b = next(it)
            if b.get("empty"):
                continue
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup)
            losses = model(b)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for m, v in losses.items():
                means[m] = 0.9 * means.get(m, v.item()) + 0.1 * v.item()
            bar.update(1)
            bar.set_postfix({m: f"{v:.3f}" for m, v in means.items()}, refresh=False)
    folders, by_attr = {}, encoder_folders(out_dir)
    for m, (attr, kind) in FOLDERS.items():
        folders[m] = save_encoder(kind, getattr(model.icode, attr).eval(), by_attr[attr])
    log(f"pretrained the toy encoders in {time.time() - t0:.0f} s ({steps} steps; masked-unit losses "
        + ", ".join(f"{m} {v:.3f}" for m, v in means.items()) + f"): {out_dir}")
    return folders
