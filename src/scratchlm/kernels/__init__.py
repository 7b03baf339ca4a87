"""Attention and GPU kernels: FlashAttention-2 written in PyTorch (`flash_attention`) and in Triton
(`flash_triton`), the choice on CUDA between ours and PyTorch's `F.scaled_dot_product_attention`
(`attention_choice`), and Triton kernels for RMSNorm and SwiGLU's activation (`fused_triton`). Triton
is optional (`pip install "scratchlm[triton]"`). The CPU's C kernels live with the model
(`scratchlm.model.kernels`)."""
