"""Parity with the official implementation on the tiny fp32 golden reference (spec §11)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.helpers import GOLDEN
from ttt.config import ConfigError
from ttt.model import official
from ttt.model.ttt import inner_lr_at, sequence_loss
from ttt.parity import ABS_TOLERANCE, GRAD_REL_TOLERANCE, run_parity


@pytest.fixture(scope="module")
def report():
    return run_parity(GOLDEN)


def test_parity_report_passes_every_check(report):
    expected = {
        "nottt/loss_per_chunk",
        "nottt/token_nll",
        "meta/loss_batch_mean",
        "meta/loss_per_seq",
        "meta/loss_per_chunk",
        "meta/token_nll",
        "trace_seq0/chunk_loss",
        "trace_seq0/inner_grad_norm_preclip",
        "trace_seq0/prime_w1_after_chunk",
        "trace_seq0/prime_w2_after_chunk",
        "trace_seq0/prime_w3_after_chunk",
        "grad",
    }
    assert set(report["checks"]) == expected
    failing = {k: v for k, v in report["checks"].items() if not v["ok"]}
    assert not failing
    assert report["ok"]


def test_tolerances_are_the_published_ones(report):
    for name, check in report["checks"].items():
        if name == "grad":
            assert check["on"] == "rel" and check["max_rel"] <= GRAD_REL_TOLERANCE == 1e-4
        else:
            assert check["on"] == "abs" and check["max_abs"] <= ABS_TOLERANCE == 1e-5


def test_inner_lr_follows_the_warmup(golden_job):
    job, step = golden_job
    assert step == 1
    assert inner_lr_at(job.ttt, step) == pytest.approx(0.55)  # 0.1 + 0.9 · (1+1)/4
    assert inner_lr_at(job.ttt, 0) == pytest.approx(0.325)
    assert inner_lr_at(job.ttt, 100) == inner_lr_at(job.ttt, None) == 1.0


def _grad_errors(model, golden, job) -> tuple[float, float]:
    grads = official.from_state_dict({n: p.grad for n, p in model.named_parameters()}, job.model)

    def worst(prefix: str) -> float:
        ref = official.normalize_keys(golden, prefix)
        return max(float(np.abs(grads[k] - v).max() / np.abs(v).max()) for k, v in ref.items())

    return worst("grad/"), worst("grad_first_order/")


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_second_order_matches_grad_not_first_order(
    golden, golden_job, golden_model, golden_tokens, recompute
):
    job, step = golden_job
    ttt = dataclasses.replace(job.ttt, recompute=recompute)
    out = sequence_loss(golden_model, *golden_tokens, ttt, step=step)
    out.loss.backward()
    to_second, to_first = _grad_errors(golden_model, golden, job)
    assert to_second < 1e-4
    assert to_first > 0.5


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_first_order_variant_matches_grad_first_order(
    golden, golden_job, golden_model, golden_tokens, recompute
):
    job, step = golden_job
    ttt = dataclasses.replace(job.ttt, recompute=recompute)
    out = sequence_loss(golden_model, *golden_tokens, ttt, step=step, first_order=True)
    out.loss.backward()
    to_second, to_first = _grad_errors(golden_model, golden, job)
    assert to_first < 1e-4
    assert to_second > 0.5  # dropping the second-order terms is not a small correction


def test_first_chunk_is_scored_before_any_update(golden_job, golden_model, golden_tokens):
    job, step = golden_job
    with torch.no_grad():
        meta = sequence_loss(golden_model, *golden_tokens, job.ttt, step=step)
        static = sequence_loss(golden_model, *golden_tokens, dataclasses.replace(job.ttt, enabled=False))
    torch.testing.assert_close(meta.chunk_losses[:, 0], static.chunk_losses[:, 0], rtol=0, atol=2e-6)
    assert (meta.chunk_losses[:, 1:] - static.chunk_losses[:, 1:]).abs().max() > 1e-3


def test_official_layout_round_trips(golden, golden_job):
    job, _ = golden_job
    tree = official.normalize_keys(golden, "param/")
    back = official.from_state_dict(official.to_state_dict(tree, job.model), job.model)
    assert back.keys() == tree.keys()
    for key, value in tree.items():
        np.testing.assert_array_equal(back[key], value)


def test_official_layout_rejects_a_mismatched_config(golden, golden_job):
    job, _ = golden_job
    tree = official.normalize_keys(golden, "param/")
    wrong = dataclasses.replace(job.model, num_layers=5, suffix_len=2)
    with pytest.raises(ValueError, match="stacked entries"):
        official.to_state_dict(tree, wrong)
    del tree["language_model.model.ln_f.weight"]
    with pytest.raises(ValueError, match=r"missing \['language_model.model.ln_f.weight'\]"):
        official.to_state_dict(tree, job.model)


def test_official_full_attention_config_maps_to_the_baseline(golden):
    official_cfg = json.loads(str(golden["config_json"]))
    official_cfg["model"].update(
        seq_modeling_block="self_attention", prime=False, suffix_len=0, mini_batch_size=96
    )
    official_cfg["training"]["train_mode"] = "pretrain"
    job, _ = official.config_from_official(official_cfg)
    assert job.model.attention == "full" and job.model.suffix_len == 0 and not job.ttt.enabled
    official_cfg["model"]["seq_modeling_block"] = "mamba"
    with pytest.raises(ConfigError, match="'mamba' is not one of"):
        official.config_from_official(official_cfg)
    del official_cfg["model"]["hidden_size"]
    official_cfg["model"]["seq_modeling_block"] = "SWA"
    with pytest.raises(ConfigError, match=r"model\.hidden_size: missing"):
        official.config_from_official(official_cfg)
