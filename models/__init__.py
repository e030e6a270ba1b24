"""PyTorch modules of vqtok. No I/O here: data, checkpoints and export live in ``training``."""
from models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from models.quantizer import QuantizerConfig, VectorQuantizerEMA
from models.vqvae import VQVAE2, VQVAEConfig

__all__ = ["VQVAE2", "GatedPixelCNN", "PixelCNNConfig", "QuantizerConfig", "VQVAEConfig", "VectorQuantizerEMA"]
