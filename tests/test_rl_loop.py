"""examples/rl_int4_rollouts.py: the GRPO loop on INT4 rollouts, its pieces and its --quick run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rl_int4_rollouts.py"


def _load():
    spec = importlib.util.spec_from_file_location("rl_int4_rollouts", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rl = _load()


def test_reward_checks_the_last_integer_with_partial_credit():
    assert rl.reward("7 + 5 = 12", 12) == 1.0
    assert rl.reward("The answer is 12.", 12) == 1.0
    assert rl.reward("7 + 5 = 11", 12) == 0.5 * (1 - 1 / 12)
    assert rl.reward("7 + 5 = 100", 12) == 0.0
    assert rl.reward("To solve this, we", 12) == 0.0


def test_group_advantages_are_centered_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    adv = rl.group_advantages(rewards, samples=3)
    assert torch.allclose(adv.view(2, 3).sum(1), torch.zeros(2), atol=1e-6)
    assert adv[0] > 0 > adv[1] and torch.equal(adv[3:], torch.zeros(3))  # no signal: no update


def test_clipped_pg_loss_clips_the_ratio_in_the_advantages_direction():
    old = torch.zeros(2, 2)
    lp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios 1.5, 1, 0.5, 1
    adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, clipped = rl.clipped_pg_loss(lp, old, adv, mask, clip_eps=0.2)
    # positive advantage: min(r, clip(r)) = 1.2, 1.0, 0.5 over the three valid tokens
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 0.5) / 3)
    assert clipped.tolist() == [[True, False], [False, False]]


def test_position_ids_follow_generate_for_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert rl.position_ids(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_rollout_logprobs_equal_a_full_forward_of_the_rollout_model():
    """generate's KV-cache logprobs are what the same model gives the whole sequence at once."""
    model, codec, _ = rl.load(quick=True)
    recipe = rl.Recipe.quick()
    ids, mask = codec.prompts([(3, 4), (12, 9)])
    torch.manual_seed(0)
    r = rl.generate(model, codec, ids, mask, recipe, sample=True)
    with torch.no_grad():
        lp = rl.train_logprobs(model, r, recipe.temperature)
    assert r.logprobs.shape == r.mask.shape == (2, r.ids.shape[1] - ids.shape[1])
    assert (lp - r.logprobs)[r.mask].abs().max() < 1e-5


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl")
    return rl.main(["--quick", "--quiet", "--out", str(out)]), out


@pytest.mark.slow
def test_quick_run_writes_json_and_plot(quick_run):
    results, out = quick_run
    assert json.loads((out / "rl_int4.json").read_text())["summary"] == results["summary"]
    assert (out / "rl_int4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["arms"]) == {"fp32", "fp32_int4", "qat4_int4"}


@pytest.mark.slow
def test_quick_run_one_graph_per_arm_across_changing_shapes(quick_run):
    results, _ = quick_run
    for arm in results["arms"].values():
        shapes = {tuple(s["batch"]) for s in arm["steps"]}
        assert len({b for b, _ in shapes}) > 1  # the batch changed between steps
        assert arm["graphs_compiled"] == 1 and arm["qatpass_errors"] == []
        for s in arm["steps"]:
            assert 0.0 <= s["reward"] <= 1.0 and s["tokens"] > 0 and s["grad_norm"] > 0


@pytest.mark.slow
def test_quick_run_qat4_rollouts_match_training_and_fp32_training_does_not(quick_run):
    results, _ = quick_run
    arms = results["arms"]
    # the same seeds: at step 0 both INT4 arms sample the same completions from the same model
    assert arms["fp32_int4"]["steps"][0]["sample"] == arms["qat4_int4"]["steps"][0]["sample"]
    assert arms["fp32_int4"]["steps"][0]["reward"] == arms["qat4_int4"]["steps"][0]["reward"]
    assert arms["qat4_int4"]["plan_matches_backend"]
    for arm in ("fp32", "qat4_int4"):  # after every refresh too (weights move at lr 1e-3)
        assert max(s["mismatch"] for s in arms[arm]["steps"]) < 1e-5
    rtn = min(s["mismatch"] for s in arms["fp32_int4"]["steps"])
    assert rtn > 100 * max(s["mismatch"] for s in arms["qat4_int4"]["steps"])
    assert results["summary"]["targets"]["qat4 >= 100x below fp32 training + INT4 rollouts"]
