import pytest


@pytest.fixture(scope="session")
def toy_small(tmp_path_factory):
    """The toy world at its 'small' size (real MP4 / JPEG / WAV files, a few seconds to make)."""
    import pipeline.toy
    out = tmp_path_factory.mktemp("toy_small")
    pipeline.toy.make_toy(str(out), size="small")
    return str(out)
