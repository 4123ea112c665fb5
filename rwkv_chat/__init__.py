"""rwkv-chat: chat with RWKV language models: RWKV-7 G1 and RWKV-4, 5, 6 and 7 World.

The stable public surface:

    from rwkv_chat import load_model, WorldTokenizer
    model = load_model(source, device="cpu", dtype=torch.float32)
    logits, state = model.forward(tokens, state=None)
    tok = WorldTokenizer(); ids = tok.encode(text); text = tok.decode(ids)
"""

from .hf.register import register_when_transformers_loads as _register_transformers_classes
from .loading.loader import ModelLoadError, load_model
from .models import RwkvConfig, RwkvModel
from .state import RwkvState

_register_transformers_classes()  # AutoConfig/AutoModelForCausalLM/AutoTokenizer learn our RWKV classes, lazily


def __getattr__(name):
    # The tokenizer reads a 65k-line vocabulary; import it only when asked for.
    if name == "WorldTokenizer":
        from .tokenizer import WorldTokenizer
        return WorldTokenizer
    raise AttributeError(f"module 'rwkv_chat' has no attribute {name!r}")


__all__ = ["load_model", "ModelLoadError", "RwkvConfig", "RwkvModel", "RwkvState", "WorldTokenizer"]
