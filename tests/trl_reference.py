"""TRL side of the preference-objective cross-check (needs torch + transformers + peft + trl; written for trl 1.16).

`trl_pair_terms` scores already-tokenized preference pairs with TRL's own code, no training:
  - DPO family (sigmoid, ipo, robust, ... any `DPOConfig.loss_type`): `trl.DPOTrainer` - its collator
    `DataCollatorForPreference`, `DPOTrainer._compute_loss` (fused-LM-head log-probs + the loss formulas + its
    metrics) and `DPOTrainer.compute_ref_log_probs` (reference = the PEFT model with its adapter disabled).
  - SimPO: `trl.experimental.cpo.CPOTrainer` (loss_type="simpo", cpo_alpha=0) - `DPODataCollatorWithPadding`,
    `concatenated_forward`, `cpo_loss`, `get_batch_loss_metrics`.
  - ORPO: `trl.experimental.orpo.ORPOTrainer` - `DPODataCollatorWithPadding`, `concatenated_forward`,
    `odds_ratio_loss`, `get_batch_loss_metrics`.
Hand-written here: only the per-pair id lists in the layout TRL's tokenizers emit, a word-level stand-in
tokenizer (TRL insists on one; it only tokenizes a throw-away dataset) and loading the adapter weights.
"""

import tempfile

import torch
from datasets import Dataset
from peft import PeftConfig, set_peft_model_state_dict
from peft.utils import load_peft_weights
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

# fp32 (TRL defaults to bf16), no checkpointing, no truncation (max_length=None), nothing reported.
_COMMON = {"report_to": [], "bf16": False, "fp16": False, "gradient_checkpointing": False, "max_length": None}


def _stand_in_tokenizer(vocab_size):
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", bos_token="t2")


def _trainer(cls, args, model_dir, adapter_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dummy = Dataset.from_list([{"prompt": "t2 t3", "chosen": " t4", "rejected": " t5"}])
    peft_config = None if adapter_dir is None else PeftConfig.from_pretrained(adapter_dir)
    # A new adapter from `peft_config` (then overwritten with the saved weights) is TRL's "reference = adapter
    # disabled" path; passing a loaded PeftModel would make DPOTrainer copy the adapter into a "ref" adapter.
    trainer = cls(model=model, args=args, train_dataset=dummy, peft_config=peft_config,
                  processing_class=_stand_in_tokenizer(model.config.get_text_config().vocab_size))
    if adapter_dir is not None:
        result = set_peft_model_state_dict(trainer.model, load_peft_weights(adapter_dir))
        assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k], result
    trainer.model.eval()
    return trainer


def _batch(trainer, feats):  # TRL's own collator, then Trainer's device placement
    return trainer._prepare_inputs(trainer.data_collator(feats))


def _floats(t):
    return [float(x) for x in t.detach().cpu().reshape(-1)]


def trl_pair_terms(model_dir, adapter_dir, pairs, case) -> dict:
    """Per-pair TRL terms for `pairs` ([{"prompt", "chosen", "rejected"}: token ids, prompt starting with <bos>,
    responses including their end token; used verbatim: no truncation, no BOS/EOS added, right padding only).

    `case`: {"loss_type": any DPO loss type ("sigmoid", "ipo", ...) | "simpo" | "orpo", "beta", and
    "label_smoothing" / "simpo_gamma" where they apply}.

    Returns lists of floats (one per pair) `chosen_logps`, `rejected_logps`, `losses`, `chosen_rewards`,
    `rejected_rewards`, plus the batch `loss` (float) as TRL reports it, and `trl_loss_type`:
      - DPO types: logps are SUMS over the response tokens (ipo and sigmoid_norm divide the log-ratios by the
        token counts inside the loss, not the logps); `ref_chosen_logps` / `ref_rejected_logps` (sums, adapter
        disabled); rewards = beta * (logps - ref_logps) (sums). Per-pair values come from 1-pair batches.
        TRL 1.16's "sigmoid" ignores label_smoothing, so sigmoid with label_smoothing > 0 runs TRL's "aot" loss
        on 1-pair batches, where its sort is the identity and its formula is exactly the conservative-DPO
        -(1-ls)*logsig(beta*d) - ls*logsig(-beta*d); the batch loss is then the mean of those (TRL's reduction).
      - simpo: logps are per-token AVERAGES over the response; rewards = beta * avg logps; no reference.
      - orpo: logps are per-token AVERAGES; TRL's `losses` are beta * logsig(log_odds) (TRL SUBTRACTS their mean);
        `log_odds_chosen` (log_odds) and `log_odds_ratio` (logsig(log_odds)) per pair; `nll_loss` is TRL's batch
        NLL: mean over all non-pad chosen-row tokens of the batch, PROMPT tokens included (all but the first);
        `nll_losses` the same on 1-pair batches; loss = nll_loss - mean(losses).
    """
    loss_type, beta = case["loss_type"], float(case["beta"])
    ls = float(case.get("label_smoothing", 0.0))
    trl_type = "aot" if loss_type == "sigmoid" and ls > 0 else loss_type
    out = {k: [] for k in ("chosen_logps", "rejected_logps", "losses", "chosen_rewards", "rejected_rewards")}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        if loss_type in ("simpo", "orpo"):
            feats = []
            for p in pairs:
                f = {"prompt_input_ids": list(p["prompt"]), "prompt_attention_mask": [1] * len(p["prompt"])}
                for side in ("chosen", "rejected"):  # the layout of CPOTrainer/ORPOTrainer.tokenize_row
                    f[f"{side}_input_ids"] = list(p["prompt"]) + list(p[side])
                    f[f"{side}_attention_mask"] = [1] * len(f[f"{side}_input_ids"])
                    f[f"{side}_labels"] = [-100] * len(p["prompt"]) + list(p[side])
                feats.append(f)
            if loss_type == "simpo":
                args = CPOConfig(tmp, loss_type="simpo", cpo_alpha=0.0, beta=beta, label_smoothing=ls,
                                 simpo_gamma=float(case.get("simpo_gamma", 0.5)), **_COMMON)
                trainer = _trainer(CPOTrainer, args, model_dir, adapter_dir)
            else:
                trainer = _trainer(ORPOTrainer, ORPOConfig(tmp, beta=beta, **_COMMON), model_dir, adapter_dir)
            fwd = trainer.concatenated_forward(trainer.model, _batch(trainer, feats))
            terms = (trainer.cpo_loss if loss_type == "simpo" else trainer.odds_ratio_loss)(fwd[0], fwd[1])
            for k, v in zip(out, (fwd[0], fwd[1], *terms[:3])):
                out[k] = _floats(v)
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _batch(trainer, feats), train_eval="eval")
            out["loss"] = float(loss)
            if loss_type == "orpo":
                out["nll_loss"] = metrics["eval_nll_loss"]
                out.update(nll_losses=[], log_odds_ratio=[], log_odds_chosen=[])
                for f in feats:
                    c, r, _, _, nll = trainer.concatenated_forward(trainer.model, _batch(trainer, [f]))
                    _, _, _, ratio, log_odds = trainer.odds_ratio_loss(c, r)
                    out["nll_losses"].append(float(nll))
                    out["log_odds_ratio"].append(float(ratio))
                    out["log_odds_chosen"].append(float(log_odds))
        else:
            args = DPOConfig(tmp, loss_type=[trl_type], beta=beta, label_smoothing=ls, **_COMMON)
            trainer = _trainer(DPOTrainer, args, model_dir, adapter_dir)
            feats = [{"prompt_ids": list(p["prompt"]), "chosen_ids": list(p["chosen"]),
                      "rejected_ids": list(p["rejected"])} for p in pairs]
            ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, _batch(trainer, feats))
            out.update(ref_chosen_logps=_floats(ref_c), ref_rejected_logps=_floats(ref_r))
            for f in feats:
                out["losses"].append(float(trainer._compute_loss(trainer.model, _batch(trainer, [f]), False)))
                m = trainer._metrics["eval"]
                for k, name in (("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected"),
                                ("chosen_rewards", "rewards/chosen"), ("rejected_rewards", "rewards/rejected")):
                    out[k].append(m[name][-1])
            out["loss"] = (sum(out["losses"]) / len(pairs) if trl_type != loss_type
                           else float(trainer._compute_loss(trainer.model, _batch(trainer, feats), False)))
    out["trl_loss_type"] = trl_type
    return out


class _OneProcess:
    """The `accelerator` GRPOTrainer._compute_loss reads, for one process: gathers and reductions are identities."""

    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor


def grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, loss_type,
              epsilon_low, epsilon_high, beta, max_completion_length):
    """TRL 1.16's GRPO loss of given per-token log-probs: `GRPOTrainer._compute_loss` itself, on a stand-in `self`.

    Arrays in TRL's dense layout: (B, T) log-probs of the policy, the sampling policy (None: TRL's on-policy path,
    `per_token_logps.detach()`) and the reference (read when beta != 0), (B,) advantages, (B, T) completion mask;
    computed in the arrays' float dtype. The stand-in `self` holds the settings `_compute_loss` reads, set as a
    plain TRL run has them (token-level importance sampling, no entropy masking or bonus, no off-policy mask, no
    vLLM, no delta clamp, no bias-corrected KL, no aux loss), one process, no gradient accumulation, train mode;
    its `_get_per_token_logps_and_entropies` returns `per_token_logps` as a leaf tensor instead of running a model.
    For dapo, `num_items_in_batch` is the mask's sum (as `_generate_and_score_completions` sets it on one process).

    Returns (loss as a float, d loss / d per_token_logps as a numpy array).
    """
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    logps = torch.tensor(per_token_logps, requires_grad=True)
    mask = torch.tensor(completion_mask).int()  # TRL's completion_mask dtype
    batch, length = logps.shape
    fake = SimpleNamespace(
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
        max_completion_length=max_completion_length, importance_sampling_level="token", top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=_OneProcess(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
    )
    inputs = {"prompt_ids": torch.zeros((batch, 1), dtype=torch.long), "prompt_mask": torch.ones((batch, 1)).int(),
              "completion_ids": torch.zeros((batch, length), dtype=torch.long), "completion_mask": mask,
              "advantages": torch.tensor(advantages, dtype=logps.dtype),
              "num_items_in_batch": mask.sum()}
    if old_per_token_logps is not None:
        inputs["old_per_token_logps"] = torch.tensor(old_per_token_logps, dtype=logps.dtype)
    if beta != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(ref_per_token_logps, dtype=logps.dtype)
    loss = GRPOTrainer._compute_loss(fake, fake.model, inputs)
    loss.backward()
    return float(loss.detach()), logps.grad.numpy()
