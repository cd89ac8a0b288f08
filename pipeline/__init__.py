"""From files on disk to examples, and the data commands (`python -m pipeline ...`).

    media.py         video / image / audio decoding (PyAV, soundfile) and the writers the toy world uses
    text.py          the tokenizer.json reader (and the toy world's tokenizer trainer)
    index.py         a manifest's line index: rows read on demand, nothing held per row
    manifest.py      JSON Lines manifests -> examples, bad rows
    sampler.py       which rows each rank trains on at each step (mixing, sharding, a permutation without a table)
    loader.py        those rows decoded in workers, bad rows skipped and counted, batches made (data.collate)
    target_cache.py  offline VQ targets on disk, in shards
    targets.py       writing them with the model's target tokenizers (`tokenize`, every rank under torchrun)
    toy.py           the toy world: small real MP4 / JPEG / WAV files with learnable cross-modal content
    decode_bench.py  decoding speed on one core (`bench`)
    precut.py        decoding once, offline: small files the loader reads cheaply (`precut`)
    commands.py      make-toy, check, bench, precut, tokenize

The paper's part of the data (masking, section 4.2.1 and appendix A.1; examples to batches) is data.py.
docs/data.md describes the pipeline at the paper's scale.
"""
