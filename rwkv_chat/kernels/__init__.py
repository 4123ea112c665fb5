"""WITH WHICH operations: matrix products (float and int8: quant), the chunked wkv forms in PyTorch
(parallel_wkv), the Triton kernels for CUDA (triton_kernels) and the C++ kernels for CPUs (cpu_kernels, csrc/).

Kernels know tensors and the recurrences' arithmetic, not modules, checkpoints or text.
"""
