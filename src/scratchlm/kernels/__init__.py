"""Attention and GPU kernels: FlashAttention-2 written in PyTorch (`flash_attention`) and in Triton
(`flash_triton`, optional: `pip install "scratchlm[triton]"`), and the choice between them and PyTorch's
`F.scaled_dot_product_attention` (`attention_choice`). The CPU's C kernels live with the model
(`scratchlm.model.kernels`)."""
