"""GRPO's loss (`objectives.policy_loss`) against TRL 1.16's own `GRPOTrainer._compute_loss` on the same tokens.

TRL's side (`trl_reference.grpo_loss`) reads the completions dense, one row
each, and backpropagates to its per-token log-probs; gemma-lora's reads them
packed (`test_grpo_loss.pack`: shuffled places and ids, garbage between).
Needs torch and trl (CI's Python 3.11 venv); skipped without them.
"""

import numpy as np
import pytest
import test_grpo_loss as grpo

RELATIVE = 1e-4


@pytest.fixture(scope="module")
def trl_grpo_loss():
    pytest.importorskip("torch", reason="the TRL cross-check needs torch (CI's Python 3.11 venv)")
    pytest.importorskip("trl", reason="the TRL cross-check needs trl 1.16 (CI's Python 3.11 venv)")
    pytest.importorskip("peft", reason="trl_reference imports peft (CI's Python 3.11 venv)")
    from trl_reference import grpo_loss

    return grpo_loss


@pytest.mark.parametrize("loss_type, mu, beta", grpo.CASES, ids=grpo.IDS)
def test_loss_and_gradient_match_trl(trl_grpo_loss, loss_type, mu, beta):
    dense = grpo.completions(seed=50 + mu, mu=mu)
    packed, where = grpo.pack(dense, seed=60 + mu)
    settings = grpo.settings_of(loss_type, beta)
    # mu = 1: TRL's on-policy path (no old log-probs: it uses per_token_logps.detach()), ours old = logps.
    old = dense["old"] if mu > 1 else None
    trl_loss, trl_grad = trl_grpo_loss(dense["logps"], old, dense["ref"], dense["advantages"], dense["mask"],
                                       loss_type, settings["epsilon_low"], settings["epsilon_high"], beta,
                                       settings["max_completion_length"])
    value, _, grad = grpo.gemma_lora_loss(packed, settings)
    # Relative to the scale of the loss's terms (>= |loss|): grpo's loss here is a near-cancelling sum, ~1% of it.
    scale = grpo.reference_loss(*grpo.dense_args(dense), **settings, magnitude=True)
    assert abs(value - trl_loss) <= RELATIVE * scale, (value, trl_loss, scale)
    ours = grpo.unpack(grad, where)
    assert np.abs(trl_grad).max() > 0
    assert np.abs(ours - trl_grad).max() <= RELATIVE * np.abs(trl_grad).max()
    # TRL reads the same data as the NumPy reference (so the two checks agree on what is compared).
    assert abs(trl_loss - grpo.reference_loss(*grpo.dense_args(dense), **settings)) <= RELATIVE * scale
