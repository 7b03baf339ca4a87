import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchlm.data.loader import BatchSampler, eval_windows, resolve_device
from scratchlm.errors import ScratchLMError
from scratchlm.train.loss import cross_entropy


def test_cross_entropy_matches_torch_and_stays_finite():
    logits, targets = torch.randn(4, 7, 50), torch.randint(0, 50, (4, 7))
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    big = torch.tensor([[1e4, 0.0, -1e4], [1e5, 1e5, 1e5]])
    losses = cross_entropy(big, torch.tensor([1, 2]), reduction="none")
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, F.cross_entropy(big, torch.tensor([1, 2]), reduction="none"))
    assert losses[0].item() == 1e4 and losses[1].item() == pytest.approx(np.log(3), rel=1e-6)


def test_batches_are_shifted_windows_and_deterministic():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, 4, 16, seed=3, device="cpu")
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive tokens: y is x shifted by one
    b = BatchSampler(tokens, 4, 16, seed=3, device="cpu")
    assert torch.equal(b.next()[0], x)
    state = a.state_dict()
    next_a = a.next()[0]
    b.load_state_dict(state)
    assert torch.equal(b.next()[0], next_a)  # the data position resumes exactly


def test_eval_windows_are_fixed_and_cover_the_start():
    tokens = np.arange(100, dtype=np.uint16)
    windows = list(eval_windows(tokens, 2, 10, 45, "cpu"))
    xs = torch.cat([x for x, _ in windows])
    assert xs.shape == (4, 10) and xs[:, 0].tolist() == [0, 10, 20, 30]


def test_device_errors():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ScratchLMError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ScratchLMError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ScratchLMError, match="too few"):
        BatchSampler(np.arange(10, dtype=np.uint16), 2, 16, 0, "cpu")
