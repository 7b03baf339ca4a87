"""Alignment: SFT, policy-gradient RL (GRPO) and DPO building blocks (`losses`), verifiable rewards
(`rewards`)."""
