"""Attention and GPU kernels: FlashAttention-2 written in PyTorch (`flash_attention`) and in Triton
(`flash_triton`), the choice on CUDA between ours and PyTorch's `F.scaled_dot_product_attention`
(`attention_choice`), Triton kernels for RMSNorm, SwiGLU's activation and the LM head's cross-entropy
(`fused_triton`), and FP8 training matmuls (`fp8`). Triton is optional (`pip install "scratchlm[triton]"`).
The CPU's C kernels live with the model (`scratchlm.model.kernels`)."""
