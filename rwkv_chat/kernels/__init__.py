"""WITH WHICH operations: matrix products (float and int8: quant), the chunked wkv forms in PyTorch
(parallel_wkv), the Triton kernels for CUDA (triton_kernels; for RWKV-6/7's decode step lora_triton,
rwkv6_triton, rwkv7_triton; the next-token draw without a sort, sampling_triton) and the C++ kernels for CPUs
(cpu_kernels, csrc/).

Kernels know tensors and the recurrences' arithmetic, not modules, checkpoints or text.
"""
