"""GRPO's step on the fast engine: sample completions with the policy, score them, then the clipped update.

    batch (prompt indices, seed) --sample--> completions + log-probs (fast/decode.py, the policy's merged weights)
          --rewards--> advantages (rollouts.group_advantages) --pack--> rows with shared prompts
          --step--> GRPO's loss (objectives.GRPO), the optimizer update, the policy's log-probs kept

A batch's completions are sampled the first time the loop asks for its
weight (at the start of its accumulation window, so every batch of an
optimizer step is sampled from the same policy) and kept in the batch's
dict: the grpo_iterations - 1 later passes over it reuse them, with the
log-probs the first pass computed as the sampling policy's (TRL's
`old_per_token_logps`). The reference (for beta > 0) is the starting
model: the LoRA factors the run started from (zero B: the base, or
`init_adapter`'s), run through the same forward, never a second copy of
the base.
"""

import time

import numpy as np

from gemma_lora import runtime
from gemma_lora.fast import decode, forward
from gemma_lora.progress import Progress
from gemma_lora.sampling import sample_of, stop_string_check
from gemma_lora.training import loop, rewards, rollouts
from gemma_lora.training.fast_engine import fast_view, lora_tree

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# The batch columns the jitted step reads (the packed rows' arrays).
STEP_COLUMNS = ("token_ids", "positions", "segment_ids", "branch_ids", "labels", "loss_weights", "sequence_ids",
                "advantages", "old_logps")


class GroupForward:
    """The functional Gemma on one batch of packed groups, as `objectives.GRPO` reads it."""

    def __init__(self, fast_config, frozen, lora, batch, sequences):
        self.fast_config, self.frozen, self.lora, self.batch, self.sequences = fast_config, frozen, lora, batch, sequences

    def completion_logps(self, temperature):
        return forward.token_logps(self.fast_config, self.frozen, self.lora, self.batch, temperature), self.batch


class GRPOStepper(loop.StepEngine):
    """Samples, scores and packs each prompt batch, then steps on it; what it measured is in `step_logs()`.

    Args:
        causal_lm: the run's Keras model (LoRA enabled).
        plan: the run's `engines.Plan` over `data.prompts.PromptRows`, with
            `plan.reference`: the starting LoRA values (Keras' order).
        precision: the run's dtype policy.
        objective: an `objectives.GRPO`.
        reward_functions: `rewards.load_rewards`' list.
    """

    def __init__(self, causal_lm, plan, precision, objective, reward_functions, verbose=True):
        super().__init__(causal_lm, plan)
        config = plan.config
        self.config, self.objective, self.rewards, self.verbose = config, objective, reward_functions, verbose
        self.prompts = plan.rows
        self.tokenizer = causal_lm.preprocessor.tokenizer
        self.stop_strings = config.resolved_stop_strings(config.chat)
        self.fast_config, self.frozen, self.paths = fast_view(causal_lm, precision, config.seed)
        self.reference = ([jnp.asarray(v) for v in plan.reference] if objective.beta else None)
        self.sampling = decode.Sampling(greedy=False, top_k=config.rollout_top_k, temperature=config.temperature,
                                        top_p=config.rollout_top_p)
        self.sequences = config.batch_size * config.num_generations
        key = (id(self.optimizer), objective, self.fast_config, tuple(self.paths), self.sequences, "grpo")
        self._step = loop.compiled_step(
            causal_lm, key,
            lambda: jax.jit(_grpo_train_step(self.fast_config, self.paths, self.optimizer, objective, self.sequences),
                            donate_argnums=(0, 1)),
        )
        fast_config = self.fast_config
        self._merge = jax.jit(lambda frozen, lora: decode.merged_params(fast_config, frozen, lora)[1])
        self.decode_config = decode.decoding_config(fast_config)
        self.logs = {}
        self.generation_seconds = self.update_seconds = 0.0
        self.sampled = 0  # prompt batches sampled

    def batch_weight(self, batch):
        self.sample(batch)
        return self.objective.batch_weight(batch["packed"])

    def sample(self, batch):
        """Sample, score and pack `batch`'s completions once (kept in the batch as "packed" and "rollout")."""
        if "packed" in batch:
            return
        started = time.perf_counter()
        config, prompts, G = self.config, self.prompts, self.config.num_generations
        indices = batch["prompt_index"]
        ids = [prompts.prompts[i] for i in indices for _ in range(G)]
        merged = self._merge(self.frozen, lora_tree(self.fast_config, self.paths, self.trainable))
        progress = Progress(len(ids), f"sampling {len(indices)} prompts x {G}", unit="completion",
                            enabled=self.verbose)
        tokens, logps = decode.generate(
            self.decode_config, merged, ids, config.max_new_tokens, prompts.stop_ids, self.sampling, seed=batch["seed"],
            ended=stop_string_check(self.tokenizer, self.stop_strings),
            progress=lambda done, made: progress.update(done - progress.n, tokens=made),
        )
        progress.close()
        samples = [sample_of(self.tokenizer, "", new, config, prompts.stop_ids, self.stop_strings) for new in tokens]
        rows = [i for i in indices for _ in range(G)]
        columns = {}
        for i in rows:
            for name in prompts.columns[i]:
                columns.setdefault(name, [])
        for name in columns:
            columns[name] = [prompts.columns[i].get(name) for i in rows]
        columns.update(
            answer=[prompts.answers[i] for i in rows], ended=[s.ended for s in samples], place=[prompts.places[i] for i in rows],
            completion_ids=[[t for t in new if t not in prompts.stop_ids] for new in tokens],
        )
        table = rewards.score(self.rewards, [prompts.texts[i] for i in rows], [s.text for s in samples], columns)
        total = rewards.weighted_total(self.rewards, table)
        advantages, equal = rollouts.group_advantages(total, G, config.scale_rewards)
        packed = rollouts.pack_groups(
            [prompts.prompts[i] for i in indices], _grouped(tokens, G), _grouped(advantages, G), _grouped(logps, G),
            config.sequence_length, config.batch_size,
        )
        packed["use_old"] = np.float32(0.0)
        lengths = np.array([len(t) for t in tokens], np.float64)
        logs = {"reward": float(total.mean()), "reward_std": float(total.std()),
                "equal_reward_groups": float(equal.reshape(-1, G)[:, 0].mean()),
                "completion_length": float(lengths.mean()), "ended_share": float(np.mean([s.ended for s in samples]))}
        for k, label in enumerate(rewards.column_labels(self.rewards)):
            logs[f"reward_{label}"] = float(table[:, k].mean())
            logs[f"reward_{label}_std"] = float(table[:, k].std())
        batch["packed"], batch["rollout"] = packed, logs
        self.sampled += 1
        seconds = time.perf_counter() - started
        batch["rollout"]["sampling_seconds"] = seconds
        self.generation_seconds += seconds
        self.plan.timing["sampling_seconds"] = round(self.generation_seconds, 2)

    def step(self, batch, scale):
        self.sample(batch)
        started = time.perf_counter()
        packed = batch["packed"]
        arrays = {name: jnp.asarray(packed[name]) for name in STEP_COLUMNS}
        arrays["use_old"] = jnp.float32(packed["use_old"])
        self.trainable, self.optimizer_values, loss_sum, weight, sums, logps = self._step(
            self.trainable, self.optimizer_values, self.frozen, self.reference, arrays, jnp.float32(scale)
        )
        loss_sum, weight = float(loss_sum), float(weight)
        first_pass = packed["use_old"] == 0
        if first_pass:
            # The policy that sampled these completions: the later passes' ratio is against it.
            packed["old_logps"], packed["use_old"] = np.asarray(logps), np.float32(1.0)
        tokens = max(float(sums["tokens"]), 1.0)
        seconds = time.perf_counter() - started
        self.update_seconds += seconds
        self.plan.timing["update_seconds"] = round(self.update_seconds, 2)
        self.logs = dict(batch["rollout"], kl=float(sums["kl"]) / tokens, clip_fraction=float(sums["clipped"]) / tokens,
                         update_seconds=seconds, sampled=first_pass)
        if first_pass:
            # How far the decoder's log-probs are from the training forward's on the same tokens (float noise, or
            # bfloat16's rounding): the ratio of the first pass is 1 by construction, this says what it hides.
            mask = packed["loss_weights"] > 0
            self.logs["logp_gap"] = float(np.abs(np.asarray(logps)[mask] - packed["sampling_logps"][mask]).mean())
        else:
            self.logs["sampling_seconds"] = 0.0
        return loss_sum, weight, loss_sum / max(weight, 1.0)

    def step_logs(self):
        return self.logs


def _grouped(values, group):
    return [list(values[at : at + group]) for at in range(0, len(values), group)]


def _grpo_train_step(fast_config, paths, optimizer, objective, sequences):
    """The jitted GRPO step: the reference's log-probs (beta > 0), the loss's gradient, the update.

    Returns the policy's log-probs too (without gradient): the sampling
    policy's for the batch's later passes. No reference to the Keras model
    (the compiled step is kept per model and must not keep it alive).
    """

    def train_step(trainable, optimizer_values, frozen, reference, batch, scale):
        if reference is not None:
            ref_lora = lora_tree(fast_config, paths, reference)
            batch = dict(batch, ref_logps=jax.lax.stop_gradient(
                forward.token_logps(fast_config, frozen, ref_lora, batch, objective.temperature)))

        def loss(trainable):
            lora = lora_tree(fast_config, paths, trainable)
            loss_sum, weight, sums, logps = objective.terms(GroupForward(fast_config, frozen, lora, batch, sequences))
            return loss_sum * scale, (loss_sum, weight, sums, jax.lax.stop_gradient(logps))

        grads, (loss_sum, weight, sums, logps) = jax.grad(loss, has_aux=True)(trainable)
        trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        return trainable, optimizer_values, loss_sum, weight, sums, logps

    return train_step
