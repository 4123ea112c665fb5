"""WHAT is computed: the RWKV architectures, one module each (rwkv4, rwkv5), the layers they share, the model
that runs any of them (model.RwkvModel) and the registry that maps a checkpoint to its architecture.

Models know tensors and their math; they know nothing of files, text, sessions or the fast runners that the
loader attaches from outside.
"""

from .architecture import Architecture
from .config import RwkvConfig
from .model import RwkvModel, empty_state
from .registry import ARCHITECTURES, SUPPORTED_VERSIONS, UnsupportedCheckpoint, architecture_for, detect

__all__ = ["ARCHITECTURES", "Architecture", "SUPPORTED_VERSIONS", "RwkvConfig", "RwkvModel", "UnsupportedCheckpoint",
           "architecture_for", "detect", "empty_state"]
