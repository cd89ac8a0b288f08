"""The three masked-unit prediction heads of i-Code pretraining (section 4.2.1, appendix A.1).

    MLMHead  fused text  [B, T_l, D]           -> logits [M, V]      over the text vocabulary
    MVMHead  fused video [B, T_v, H_v, W_v, D] -> logits [M, K]      eq. (4)-(6): 3D deconv, then linear
    MSMHead  fused speech [B, T_s, D]          -> logits [M*G, vars] per codebook group (or [M, vars**G])

Every head takes the labels too (the target id at masked positions, -100 elsewhere) and returns
`(logits, targets)` for the masked positions only (`select_masked`): positions are selected *before* the vocabulary
projection, so a 128k-way text decoder is never applied to unmasked tokens. `losses.masked_unit_loss(logits,
targets)` (cross-entropy over targets != -100, mean over them) turns the pair into L_MLM, L_MVM, L_MSM.
Unmasked positions contribute nothing: neither to the loss nor, since they are never selected, to any
gradient through the head.

Following BERT (Devlin et al. 2019) and DeBERTa's MLM head, the text head is dense -> GELU -> LayerNorm ->
decoder. The vision head follows the deconvolution head of BEVT (Wang et al. 2021), the one appendix A.1
cites. Differences from the paper: the paper does not say whether the MLM decoder is tied, nor the exact
layers of DeConv; our choices are documented on each class.
"""
import torch.nn as nn
import torch.nn.functional as F

from model.quantizers import combined_index


def masked_positions(x, labels):
    """keep [*S] bool: the positions of x [*S, D] whose label [*S] (or, with codebook groups, [*S, G]: any
    group's) is not -100."""
    s = x.shape[:-1]
    if labels.shape[:len(s)] != s or labels.dim() > len(s) + 1:
        raise ValueError(f"features {tuple(s)} and labels {tuple(labels.shape)} differ in shape")
    keep = labels != -100
    return keep.any(-1) if labels.dim() > len(s) else keep


def select_masked(x, labels):
    """x [*S, D], labels [*S] or [*S, G] -> (x [M, D], labels [M] or [M, G]) at the masked positions
    (`masked_positions`), in row-major order. M is a count only the device knows: `nonzero` waits for it.
    (training/static_rows.py has the fixed-size form CUDA graphs need, tested equal in loss and gradients.)"""
    idx = masked_positions(x, labels).nonzero(as_tuple=True)
    return x[idx], labels[idx]


class MLMHead(nn.Module):
    """Masked language modelling head: dense(D, D) -> GELU -> LayerNorm -> decoder(D, V) (+ own bias).

    Tying: pass the language encoder's word-embedding weight [V, D] as `embedding_weight` and the decoder
    shares it (BERT, DeBERTa and nanoGPT tie the output layer to the input embeddings). Tying is optional
    (`ICodeConfig.tie_mlm`, off by default: the paper's 154M fusion count includes an untied decoder); in the
    paper preset (D = C = 768) it saves the untied 128,100 x 768 decoder's 98M parameters, more than the 86M of
    DeBERTa-V3-base's Transformer layers, and the pretrained embedding gives the decoder a good start.
    It needs the fusion width D to equal the text width C; otherwise leave it None (an untied decoder).
    A tied weight appears in the full model's state_dict under both names (as in nanoGPT): save with
    `safetensors.torch.save_model`, which de-duplicates, or drop one name.
    """

    def __init__(self, dim, vocab_size, *, embedding_weight=None, layer_norm_eps=1e-7):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)   # 1e-7: DeBERTa-V3's eps
        self.decoder = nn.Linear(dim, vocab_size)
        self.tied = embedding_weight is not None
        if self.tied:
            if tuple(embedding_weight.shape) != (vocab_size, dim):
                raise ValueError(f"embedding_weight has shape {tuple(embedding_weight.shape)}, the decoder needs "
                                 f"(vocab_size, dim) = ({vocab_size}, {dim}): tying needs D equal to the text width")
            self.decoder.weight = embedding_weight                # the same Parameter, one tensor in memory

    def forward(self, x, labels, select=select_masked):
        """x [B, T_l, D], labels [B, T_l] -> (logits [M, V], targets [M]), M = #labels != -100."""
        h, targets = select(x, labels)                            # [M, D], [M]
        h = self.layer_norm(F.gelu(self.dense(h)))                # [M, D]
        return self.decoder(h), targets                           # [M, V]


class MVMHead(nn.Module):
    """Masked vision modelling head, appendix A.1 eq. (4)-(6).

    Eq. (4): f_MVM = DeConv(f_mv), from the fused grid W/32 x H/32 x T/2 to the token grid W/16 x H/16 x T.
    DeConv (our choice, after BEVT's decoder): one ConvTranspose3d(D, D, kernel (2, 2, 2), stride (2, 2, 2)),
    then LayerNorm and GELU. Kernel = stride, so each fused cell becomes its own 2 x 2 x 2 block of token
    cells (no overlap, no checkerboard), and one layer doubles all three axes exactly as eq. (4) asks.
    Eq. (5): p = softmax(W f_MVM + b) over the K codebook entries, applied at masked cells only.
    Eq. (6): the mean cross-entropy over the masked cells N_m is `masked_unit_loss(logits, targets)`.
    Example, 8 frames of 224 x 224, D = 768: [B, 4, 7, 7, 768] -> deconv [B, 8, 14, 14, 768] -> M masked
    cells [M, 768] -> [M, 8192].
    Odd grids: Video Swin's patch merging pads an odd grid at the bottom / right, so 112 x 112 frames give a
    4 x 4 fused grid (covering 128 pixels); its 8 x 8 deconvolution is cropped to the 7 x 7 token grid of the
    labels (the extra row / column is padding). Any other size mismatch is an error.
    """

    def __init__(self, dim, codebook_size, *, layer_norm_eps=1e-5):
        super().__init__()
        self.deconv = nn.ConvTranspose3d(dim, dim, kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.classifier = nn.Linear(dim, codebook_size)           # W, b of eq. (5)

    def upsample(self, grid):
        """Eq. (4): f_MVM = DeConv(f_mv), [B, T_v, H_v, W_v, D] -> [B, T, H/16, W/16, D] with T = 2 T_v,
        H/16 = 2 H_v, W/16 = 2 W_v: the 3D deconvolution on the channels-first grid, then LayerNorm and GELU."""
        x = self.deconv(grid.permute(0, 4, 1, 2, 3))              # [B, D, T, H/16, W/16]
        return F.gelu(self.layer_norm(x.permute(0, 2, 3, 4, 1)))  # [B, T, H/16, W/16, D]  e.g. 8 x 14 x 14 x 768

    def forward(self, grid, labels, select=select_masked):
        """grid [B, T_v, H_v, W_v, D], labels [B, T, H/16, W/16] (tube-masked token ids, -100 elsewhere)
        -> (logits [M, K], targets [M])."""
        B, T_v, H_v, W_v, _ = grid.shape
        up = (2 * T_v, 2 * H_v, 2 * W_v)
        if labels.shape[0] != B or labels.dim() != 4 or any(not (u - 1 <= n <= u) for u, n in zip(up, labels.shape[1:])):
            raise ValueError(f"labels {tuple(labels.shape)} do not match the deconvolved grid {(B,) + up} of the "
                             f"fused grid {tuple(grid.shape[:4])} (at most one padded row / column / frame)")
        T, h, w = labels.shape[1:]
        x = self.upsample(grid)[:, :T, :h, :w]                    # [B, T, H/16, W/16, D] (crop Swin's padding)
        h, targets = select(x, labels)                            # [M, D], [M]
        return self.classifier(h), targets                        # [M, K]


class MSMHead(nn.Module):
    """Masked span modelling head over the wav2vec 2.0 quantizer's ids (section 4.2.1).

    combined=False (default): one linear layer emitting G x vars logits, i.e. an independent vars-way
    classifier per codebook group; the loss is the mean of the G group cross-entropies. It keeps the head
    small (768 x 640) and every class is seen often: wav2vec 2.0's 2 x 320 groups are each well used, while
    only a fraction of the 102,400 pairs ever occur.
    combined=True: one classifier over the combined id i0 * vars + i1 (fairseq `to_codebook_index`),
    vars**G classes (102,400, a 79M-parameter layer at D = 768): models the joint, not the factorised,
    distribution.
    """

    def __init__(self, dim, groups=2, vars=320, combined=False):
        super().__init__()
        self.groups, self.vars, self.combined = groups, vars, combined
        self.classifier = nn.Linear(dim, vars ** groups if combined else groups * vars)

    def forward(self, x, labels, select=select_masked):
        """x [B, T_s, D], labels [B, T_s, G] per-group ids (-100 at unmasked frames); with combined=True the
        labels may also be combined ids [B, T_s].
        Returns (logits [M*G, vars], targets [M*G]), or with combined=True (logits [M, vars**G], targets [M])."""
        if labels.dim() == 3:
            if labels.shape[-1] != self.groups:
                raise ValueError(f"labels have {labels.shape[-1]} groups, the head {self.groups}")
            if self.combined:
                labels = combined_index(labels, self.vars)       # [B, T_s]
        elif not self.combined:
            raise ValueError(f"per-group MSM needs labels [B, T_s, {self.groups}], got {tuple(labels.shape)}")
        if self.combined:
            h, targets = select(x, labels)                        # [M, D], [M]
            return self.classifier(h), targets                    # [M, vars**G]
        if x.shape[:2] != labels.shape[:2]:
            raise ValueError(f"features {tuple(x.shape[:2])} and labels {tuple(labels.shape[:2])} differ in [B, T_s]")
        h, targets = select(x, labels)                            # masked frames: [M, D], [M, G]
        logits = self.classifier(h).view(-1, self.groups, self.vars)  # [M, G, vars]
        return logits.reshape(-1, self.vars), targets.reshape(-1)  # [M*G, vars], [M*G]
