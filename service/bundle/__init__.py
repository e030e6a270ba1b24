"""The bundle contract, shared by training (which writes bundles) and the service (which reads them).

numpy and Pillow only: the manifest and its typed views, the code wire format, the sampling
semantics and the image preprocessing. Nothing here imports torch or ONNX Runtime.
"""
from service.bundle.manifest import (
    DECODER,
    DEFAULT_BUNDLE,
    ENCODER,
    FORMAT_VERSION,
    ID_CHARS,
    MANIFEST,
    Bundle,
    BundleError,
    Level,
    prior_graph,
    sha256_file,
    version_id,
)

__all__ = ["DECODER", "DEFAULT_BUNDLE", "ENCODER", "FORMAT_VERSION", "ID_CHARS", "MANIFEST", "Bundle", "BundleError",
           "Level", "prior_graph", "sha256_file", "version_id"]
