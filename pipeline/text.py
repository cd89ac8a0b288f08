"""Text through a `tokenizers` tokenizer.json (DeBERTa-V3's, saved once with transformers; or one trained here
for the toy world). The project never imports transformers: this is the tokenizer the collator uses.
"""
import collections
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork DataLoader workers after using the tokenizer

import tokenizers  # noqa: E402
import torch


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids the collator needs.

    .tokenizer    the tokenizers.Tokenizer (its post-processor adds [CLS] ... [SEP])
    .vocab_size, .pad_id, .mask_id, .cls_id, .sep_id, .unk_id, .special_ids (a sorted tuple)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

        def find(*names):
            for n in names:
                i = tokenizer.token_to_id(n)
                if i is not None:
                    return i
            return None
        self.pad_id = find("[PAD]", "<pad>")
        self.mask_id = find("[MASK]", "<mask>")
        self.cls_id = find("[CLS]", "<s>", "<cls>")
        self.sep_id = find("[SEP]", "</s>", "<sep>")
        self.unk_id = find("[UNK]", "<unk>")
        if self.pad_id is None or self.mask_id is None:
            raise ValueError(f"tokenizer needs a pad and a mask token, got pad={self.pad_id} mask={self.mask_id}")
        self.special_ids = tuple(sorted({i for i in (self.pad_id, self.mask_id, self.cls_id, self.sep_id) if i is not None}))

    def encode_one(self, text, pair=None, max_len=128):
        """One text (and an optional second segment) -> list of ids, truncated to max_len keeping the final [SEP]."""
        ids = self.tokenizer.encode(text, pair).ids
        if len(ids) > max_len:
            ids = ids[:max_len - 1] + [ids[-1]] if ids[-1] == self.sep_id else ids[:max_len]
        return ids

    def pad(self, seqs, length=None):
        """lists of ids -> (ids [B, L] long padded with pad_id, attention [B, L] bool, True = real token).
        L is the longest sequence's length, or `length` when given (no sequence may be longer)."""
        longest = max(len(s) for s in seqs)
        if length is not None and longest > length:
            raise ValueError(f"a sequence of {longest} ids does not fit the padded length {length}")
        L = max(1, longest) if length is None else length
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        att = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            att[i, :len(s)] = True
        return ids, att

    def encode(self, texts, max_len=128):
        """list of str (or (first, second) pairs) -> (ids [B, L] long, attention [B, L] bool)."""
        return self.pad([self.encode_one(*t, max_len=max_len) if isinstance(t, tuple) else
                         self.encode_one(t, max_len=max_len) for t in texts])


def load_tokenizer(path):
    """tokenizer.json -> TextTokenizer (the raw `tokenizers.Tokenizer` is its `.tokenizer`)."""
    return TextTokenizer(tokenizers.Tokenizer.from_file(str(path)))


def train_tokenizer(texts, path, vocab_size=400):
    """Build a lower-cased WordPiece tokenizer.json from `texts`: [PAD]=0, [UNK], [CLS], [SEP], [MASK], every
    character (alone and as a "##" continuation, so no word is ever unknown), then the most frequent whole
    words. Counting words ourselves instead of running a `tokenizers` trainer keeps the file bit-identical
    from run to run (the trainers break ties between equal counts in no fixed order)."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    vocab = specials + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in vocab]
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(path))
    return TextTokenizer(tok)
