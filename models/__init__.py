"""PyTorch modules of vqtok. No I/O here: data, checkpoints and export live in ``training``."""
from models.cached_prior import CachedPrior
from models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from models.quantizer import (
    FactorizedQuantizer,
    FiniteScalarQuantizer,
    Quantizer,
    QuantizerConfig,
    VectorQuantizerEMA,
    make_quantizer,
    rotate_to,
)
from models.vqvae import VQVAE2, VQVAEConfig

__all__ = ["VQVAE2", "CachedPrior", "FactorizedQuantizer", "FiniteScalarQuantizer", "GatedPixelCNN", "PixelCNNConfig", "Quantizer",
           "QuantizerConfig", "VQVAEConfig", "VectorQuantizerEMA", "make_quantizer", "rotate_to"]
