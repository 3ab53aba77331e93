"""Parameter and FLOP counts against the spec's table (§2.10) and against brute force."""

from __future__ import annotations

import pytest
import torch

from ttt.config import preset
from ttt.model.counting import flops_per_token, mean_keys_per_query, param_counts
from ttt.model.transformer import Transformer

# spec §2.10: total parameters (tied embedding counted once), E2E and full attention, and inner params.
SPEC_TOTALS = {
    "125m": (184_363_776, 183_474_432, 11_501_568),
    "350m": (444_448_768, 439_717_888, 42_467_328),
    "760m": (883_728_384, 876_632_064, 92_012_544),
    "1b": (1_467_708_416, 1_458_246_656, 160_432_128),
    "3b": (2_897_722_880, 2_866_224_640, 346_030_080),
}


@pytest.mark.parametrize("size", SPEC_TOTALS)
def test_preset_parameter_counts_match_the_spec(size):
    e2e, fa, inner = SPEC_TOTALS[size]
    assert param_counts(preset(size).model).total == e2e
    assert param_counts(preset(f"{size}-fa").model).total == fa
    assert param_counts(preset(size).model).inner == inner
    assert param_counts(preset(f"{size}-fa").model).inner == 0


@pytest.mark.parametrize("name", ["tiny", "125m", "3b", "1b-fa", "350m-swa"])
def test_formula_matches_the_module(name):
    cfg = preset(name).model
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.inner == sum(p.numel() for b in model.suffix_layers for p in b.prime_weights())
    assert counts.embedding == model.embed.weight.numel()


@pytest.mark.parametrize(("length", "window"), [(10, None), (10, 3), (10, 10), (10, 50), (1, 1)])
def test_mean_keys_per_query_matches_brute_force(length, window):
    w = length if window is None else window
    assert mean_keys_per_query(length, window) == pytest.approx(
        sum(min(t + 1, w) for t in range(length)) / length
    )


def test_flops_relations():
    e2e, fa = preset("125m"), preset("125m-fa")
    f_fa = flops_per_token(fa.model, 8192, ttt_enabled=False, recompute="none")
    # Without attention, forward FLOPs are 2 per matmul weight (embedding lookup is free, tied head is not).
    matmul_weights = param_counts(fa.model).total - 2 * 64 * 12 - 4 * 768 * 12 - 768
    attention = 12 * 4 * 768 * mean_keys_per_query(8192, None)
    assert f_fa.forward == pytest.approx(2 * matmul_weights + attention)
    assert f_fa.train == 3 * f_fa.forward == f_fa.train_with_recompute
    f_e2e = flops_per_token(e2e.model, 8192, ttt_enabled=True)
    assert f_e2e.train > 5 * f_e2e.forward and f_e2e.train_with_recompute > f_e2e.train
    no_ttt = flops_per_token(e2e.model, 8192, ttt_enabled=False, recompute="none")
    assert no_ttt.forward == f_e2e.forward and no_ttt.train == 3 * no_ttt.forward
