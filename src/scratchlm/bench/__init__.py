"""`scratchlm bench`: where a training step's time and memory go, for a named size or a TOML config.

- `sizes`: the named sizes (the course's small ... 2.7B, and CPU-sized ones, the defaults on a CPU);
- `timing`: forward, forward + backward and the full step (AdamW), warmed up, then n steps timed with
  the device synchronised: mean, standard deviation, tokens/s and MFU;
- `profile`: a `torch.profiler` trace (Chrome-trace JSON, opens in Perfetto) and the top operators by
  self time, with the share spent in matmuls;
- `memory`: the bytes saved for backward by kind beside the accounting's prediction; on CUDA the peak
  allocated memory and a memory snapshot.
"""
