import os

import pytest


@pytest.fixture(scope="session")
def toy_small(tmp_path_factory):
    """The toy world at its 'small' size (real MP4 / JPEG / WAV files, a few seconds to make)."""
    import pipeline.toy
    out = tmp_path_factory.mktemp("toy_small")
    pipeline.toy.make_toy(str(out), size="small")
    return str(out)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy world at its 'tiny' size (a few rows per manifest)."""
    import pipeline.toy
    out = str(tmp_path_factory.mktemp("toy"))
    pipeline.toy.make_toy(out, seed=0, size="tiny")
    return out


@pytest.fixture(scope="module")
def tok(toy):
    import pipeline.text
    return pipeline.text.load_tokenizer(os.path.join(toy, "tokenizer.json"))
