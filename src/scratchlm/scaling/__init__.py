"""Scaling laws: runs defined by FLOP budgets, and fits that predict the compute-optimal model.

- `points`: the runs to fit (parameters N, tokens D, compute C, loss) read from a sweep's results, the
  CS336 IsoFLOP JSON or a CSV;
- `fit`: Chinchilla's three approaches (the lower envelope, IsoFLOP parabolas, the parametric
  L(N, D) = E + A / N^alpha + B / D^beta), each with bootstrap intervals, and predictions;
- `plot`: the IsoFLOP curves, the fitted frontier and the prediction, as PNG.
"""
