"""From files on disk to examples, and the data commands (`python -m pipeline ...`).

    media.py     video / image / audio decoding (PyAV, soundfile) and the writers the toy world uses
    text.py      the tokenizer.json reader (and the toy world's tokenizer trainer)
    manifest.py  JSON Lines manifests -> examples, bad rows, offline VQ targets read back
    sampler.py   which rows each rank trains on at each step (mixing, sharding, resume)
    loader.py    those rows decoded in workers, bad rows skipped and counted, batches made (data.collate)
    toy.py       the toy world: small real MP4 / JPEG / WAV files with learnable cross-modal content
    targets.py   offline VQ targets written beside a manifest (`tokenize`)
    commands.py  make-toy, check, bench, tokenize

The paper's part of the data (masking, section 4.2.1 and appendix A.1; examples to batches) is data.py.
"""
