"""HOW a model runs fast here: weights packed per layer, fused decode steps (Triton on CUDA, C++ on CPUs), the
parallel prefill, CUDA graphs. `fast_path.attach_fast_path(model)` attaches the runner to a plain `RwkvModel`
from outside; the model itself never imports this package.
"""
