"""i-Code's modules: encoders (deberta, wavlm, swin3d), fusion, heads, target quantizers, weight loading."""
from model.quantizers import load_quantizer  # noqa: F401
from model.weights import load_encoder  # noqa: F401
