"""omnimoe: the OmniMoE layer (atomic experts, Cartesian-product router, expert-centric
scheduling) over a C++/CUDA library.

    omnimoe.torch      the PyTorch module OmniMoE(config) and the ops behind it
    omnimoe.reference  the same layer in plain PyTorch (slow; tests and debugging)
    omnimoe._omnimoe   the binding: DLPack tensors in, one C++ call, no framework needed
"""

from ._omnimoe import Error, cuda_available, version
from .config import OmniMoEConfig

__version__ = version()
__all__ = ["Error", "OmniMoEConfig", "cuda_available", "version", "__version__"]
