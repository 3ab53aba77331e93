"""`ttt.compile`: the compiled prefix and inner step give the official meta-gradient, second order.

The numerics run on the `aot_eager_decomp_partition` backend: the graphs inductor would get (traced through
torch.func, decomposed, split by the min-cut partitioner under the policy's memory budget), run eagerly, so
that a compile takes seconds on two cores instead of minutes. Inductor's own code generation is checked once,
on the smallest shapes that still take two inner steps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from tests.helpers import random_batch, random_model, small_job
from tests.unit.test_golden import _grad_errors
from ttt.config import ConfigError, preset
from ttt.model.ttt import sequence_loss


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_compiled_second_order_matches_grad_not_first_order(
    golden, golden_job, golden_model, golden_tokens, recompute
):
    job, step = golden_job
    ttt = dataclasses.replace(
        job.ttt, recompute=recompute, compile=True, compile_backend="aot_eager_decomp_partition"
    )
    out = sequence_loss(golden_model, *golden_tokens, ttt, step=step)
    out.loss.backward()
    to_second, to_first = _grad_errors(golden_model, golden, job)
    assert to_second < 1e-4
    assert to_first > 0.5  # the compiled inner gradient is differentiated, not taken as a constant

    graphs = counters["stats"]["unique_graphs"]
    golden_model.zero_grad()
    again = sequence_loss(golden_model, *golden_tokens, ttt, step=step)
    again.loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs, "a second step must reuse the compiled graphs"
    torch.testing.assert_close(again.loss, out.loss, rtol=0, atol=0)


def test_inductor_gives_the_eager_meta_gradient():
    # T = 2b, W = b: a first step without caches and one with a full window, the only two graph shapes.
    job = small_job(8, "ttt.mini_batch_size=4", "model.window_size=4", "ttt.inner_clip=2.5")
    grads = {}
    for compiled in (False, True):
        model = random_model(job)
        ttt = dataclasses.replace(job.ttt, recompute="selective", compile=compiled)
        sequence_loss(model, *random_batch(job), ttt).loss.backward()
        grads[compiled] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() < 1e-5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ttt.compile=true", "ttt.recompute=full"], "saved-tensor hooks"),
        (["ttt.compile=true", "scale.zero_stage=3", "ttt.recompute=selective"], "ZeRO-3"),
        (["ttt.compile_backend=eager"], "ttt.compile_backend"),
    ],
)
def test_unsupported_compile_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        preset("tiny").with_overrides(overrides)
    assert info.value.field.startswith("ttt.compile")
