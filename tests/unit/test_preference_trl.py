"""The preference objectives against TRL's own code, on a tiny Gemma 3 exported to transformers + PEFT.

gemma-lora's side runs the real path (the fast forward's pair batches,
`PairScores`, the objective's terms); TRL's side (`trl_reference.py`) runs
TRL 1.16's trainers' own log-prob and loss functions on the same token ids,
with the reference TRL's way (the PEFT adapter disabled). Needs torch,
transformers, peft and trl (CI's Python 3.11 venv); skipped without them.
"""

import numpy as np
import pytest
from tiny_models import dolly_texts, exportable

from gemma_lora.config import TrainConfig
from gemma_lora.data.preference import PairRows
from gemma_lora.export import Provenance
from gemma_lora.export.peft import export_peft
from gemma_lora.model import loading
from gemma_lora.training import objectives, preference

RELATIVE = 1e-4
CASES = {
    "dpo": ({"loss_type": "sigmoid", "beta": 0.1}, objectives.DPO(beta=0.1)),
    "dpo, label smoothing": ({"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.2},
                             objectives.DPO(beta=0.1, label_smoothing=0.2)),
    "ipo": ({"loss_type": "ipo", "beta": 0.1}, objectives.IPO(beta=0.1)),
    "simpo": ({"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}, objectives.SimPO(beta=2.0, gamma=0.5)),
    "orpo": ({"loss_type": "orpo", "beta": 0.1}, objectives.ORPO(beta=0.1)),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(LoRA model, exported folder with base/, pairs as token ids) on a tiny Gemma 3."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    tmp = tmp_path_factory.mktemp("trl")
    lora, preset, _ = exportable("gemma3", tmp, rank=4, alpha=8.0)
    out = export_peft(lora, tmp / "peft", Provenance("tiny-base", "a.lora.h5"), base=loading.load_causal_lm(preset, "float32"))
    tokenizer = lora.preprocessor.tokenizer
    bos, eos = tokenizer.start_token_id, tokenizer.end_token_id
    texts = [[int(t) for t in tokenizer.tokenize(text)] for text in dolly_texts(8)]
    pairs = [  # prompts and responses of different lengths; each response ends with <eos>
        {"prompt": [bos, *texts[i][: 6 + 3 * i]], "chosen": [*texts[i + 4][: 5 + 4 * i], eos],
         "rejected": [*texts[7 - i][2 : 12 - i], eos]}
        for i in range(4)
    ]
    return lora, out, pairs


def gemma_lora_terms(lora, pairs, objective):
    """gemma-lora's per-pair terms and mean loss, the reference being the base (LoRA B = 0), as TRL's."""
    rows = PairRows([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
    config = TrainConfig(preset="tiny", sequence_length=128, batch_size=2, precision="float32")
    scorer = preference.PairScorer(lora, config, "float32")
    layers = [v for v in lora.trainable_variables if "lora_kernel_b" in v.path]
    kept = [np.asarray(v.value) for v in layers]
    for v in layers:
        v.assign(np.zeros(v.shape, "float32"))
    reference = preference.reference_logps(scorer, rows, list(range(len(rows))), label=None)
    for v, value in zip(layers, kept):
        v.assign(value)
    preference.with_reference(rows, reference)
    policy = scorer.token_logps(rows)
    sums = np.asarray([[side.sum() for side in sides] for sides in policy])
    refs = np.asarray([[side.sum() for side in reference[i]] for i in range(len(rows))])
    counts = np.asarray([[len(p["chosen"]), len(p["rejected"])] for p in pairs], np.float32)
    losses, rewards, used = objective.losses(sums, counts, refs)
    mean_loss = preference.PairScores(scorer, objective, rows)()["loss"]
    return {"losses": np.asarray(losses), "rewards": np.asarray(rewards), "used": np.asarray(used),
            "sums": sums, "reference": refs, "counts": counts, "mean_loss": mean_loss}


def close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=RELATIVE, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_log_probs_match_trl(setup, case):
    from trl_reference import trl_pair_terms

    lora, out, pairs = setup
    settings, objective = CASES[case]
    trl = trl_pair_terms(str(out / "base"), str(out), pairs, settings)
    ours = gemma_lora_terms(lora, pairs, objective)
    # TRL's log-probs: sums over the response for dpo and ipo, means per token for simpo and orpo.
    close(ours["used"][:, 0], trl["chosen_logps"])
    close(ours["used"][:, 1], trl["rejected_logps"])
    close(ours["rewards"][:, 0], trl["chosen_rewards"])
    close(ours["rewards"][:, 1], trl["rejected_rewards"])
    if objective.uses_reference:
        close(ours["reference"][:, 0], trl["ref_chosen_logps"])
        close(ours["reference"][:, 1], trl["ref_rejected_logps"])
    if case == "orpo":
        # TRL's odds-ratio term (lambda log sigmoid(log odds)); its cross-entropy term is over the prompt
        # too and pooled over the batch, ours over each pair's response (objectives.ORPO says so).
        means = ours["sums"] / ours["counts"]
        close(-ours["losses"] - means[:, 0], trl["losses"])
        return
    close(ours["losses"], trl["losses"])
    close(ours["mean_loss"], trl["loss"])
    assert np.ptp(ours["losses"]) > 1e-3  # the pairs differ: a per-pair mix-up would show
