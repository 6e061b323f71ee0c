"""Time the classic KerasHub LoRA recipe against the fast JAX path.

    python scripts/benchmark.py --shape tiny                  # CPU smoke, < 1 min (also tiny_gemma3, tiny_gemma2)
    python scripts/benchmark.py --shape gemma_2b --data dolly # on a GPU
    python scripts/benchmark.py --shape gemma3_1b             # Gemma 3 (also gemma3_270m)
    python scripts/benchmark.py --shape gemma2_2b             # Gemma 2: soft-capped attention vs none

Every variant runs in its own subprocess, so each one's peak device memory
(`memory_stats()["peak_bytes_in_use"]`, which cannot be reset) is its own, and
one variant running out of memory does not end the others. All variants train
LoRA rank 4 on query/value with AdamW(5e-5, weight decay 0.01) on random
weights of the chosen shape, on rows of `--seq` tokens that are all real (no
padding); the fast path's rows hold 4 packed examples each, so its segment
masking is paid for. Timing: one first step (compile included, reported as
"first step"), `--warmup` more, then `--steps` timed steps closed by a device
sync.

"useful tok/s" is tok/s times the share of real (non-padding) tokens the
variant's batching gives on Dolly's no-context rows: padding each example to
`--seq` for the KerasHub recipe, packing for the fast path. It needs `--data
dolly`; without it the column repeats tok/s (the timed rows hold no padding).
Token counts for Dolly come from the package's tiny 1,024-piece SentencePiece
vocabulary, a proxy: the real Gemma vocabulary gives shorter sequences.

The `part_*` variants time pieces of the fast step (forward only; backbone
forward+backward; loss head and its gradient) to show where its time goes.
On a Gemma 2 shape, `fast_no_attention_cap` drops the attention-logit soft
cap, so its layers take jax.nn.dot_product_attention (cuDNN on a GPU)
instead of the fast path's own soft-capped attention: the difference to
`fast` is what the soft-capped path costs (the model it times is not Gemma 2).
The KerasHub variants need keras-hub's input pipeline: without TensorFlow,
install `grain` (keras-hub 0.32 refuses `fit` on dict inputs otherwise).
Results and the GPU commands used: docs/perf.md.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # Small enough for a CPU smoke run in seconds.
    "tiny": dict(
        vocabulary_size=256,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=32,
    ),
    # gemma_2b_en's exact shape (KerasHub stores intermediate_dim = 2 x FFN width).
    "gemma_2b": dict(
        vocabulary_size=256000,
        num_layers=18,
        num_query_heads=8,
        num_key_value_heads=1,
        hidden_dim=2048,
        intermediate_dim=32768,
        head_dim=256,
    ),
    # A tiny Gemma 3 with both kinds of layers (6 sliding, 1 global), for CPU smoke.
    "tiny_gemma3": dict(
        arch="gemma3",
        vocabulary_size=256,
        num_layers=7,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=32,
        sliding_window_size=64,
    ),
    # Gemma 3 text models (KerasHub's Gemma3Backbone: query/key norms, post
    # norms, five sliding-window layers to one global; intermediate_dim is
    # the FFN width). 270M is the offline demo model; 1B the smallest preset.
    "gemma3_270m": dict(
        arch="gemma3",
        vocabulary_size=262144,
        num_layers=18,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=640,
        intermediate_dim=2048,
        head_dim=256,
        sliding_window_size=512,
    ),
    "gemma3_1b": dict(
        arch="gemma3",
        vocabulary_size=262144,
        num_layers=26,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=1152,
        intermediate_dim=6912,
        head_dim=256,
        sliding_window_size=512,
    ),
    # A tiny Gemma 2 (post norms, both soft caps, window 64 on layers 0, 2, ...), for CPU smoke.
    "tiny_gemma2": dict(
        arch="gemma2",
        vocabulary_size=256,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=32,
        sliding_window_size=64,
    ),
    # gemma2_2b_en's exact shape (KerasHub's GemmaBackbone with Gemma 2's features:
    # soft caps 50 / 30, window 4096 on every other layer, post norms).
    "gemma2_2b": dict(
        arch="gemma2",
        vocabulary_size=256000,
        num_layers=26,
        num_query_heads=8,
        num_key_value_heads=4,
        hidden_dim=2304,
        intermediate_dim=18432,
        head_dim=256,
        sliding_window_size=4096,
    ),
}
# KerasHub's Gemma 2 settings beyond the shape (gemma2_2b_en's config).
GEMMA2_FEATURES = dict(use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0,
                       final_logit_soft_cap=30.0, use_sliding_window_attention=True)


def keras_causal_lm(shape, dtype):
    """A KerasHub causal LM of `shape` with random weights, no preprocessor."""
    import keras_hub

    dims = dict(SHAPES[shape])
    arch = dims.pop("arch", "gemma")
    if arch == "gemma3":
        backbone = keras_hub.models.Gemma3Backbone(
            **dims, image_size=None, use_post_ffw_norm=True, use_post_attention_norm=True,
            use_sliding_window_attention=True, dtype=dtype,
        )
        return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    if arch == "gemma2":
        dims.update(GEMMA2_FEATURES)
    backbone = keras_hub.models.GemmaBackbone(**dims, dtype=dtype)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def fast_dims(shape):
    """`FastConfig`'s architecture fields for `shape`, as `fast.architecture` reads them."""
    dims = dict(SHAPES[shape])
    arch = dims.pop("arch", "gemma")
    if arch == "gemma2":
        window = dims.pop("sliding_window_size")
        dims["ffw_dim"] = dims.pop("intermediate_dim") // 2
        # GemmaBackbone's Gemma 2 layout: layers 0, 2, 4, ... slide; all take RoPE 1e4.
        layers = [(window if i % 2 == 0 else 0, 10_000.0, 1.0) for i in range(dims["num_layers"])]
        return dict(dims, post_attention_norm=True, post_ffw_norm=True, layer_attention=tuple(layers),
                    attention_logit_soft_cap=GEMMA2_FEATURES["attention_logit_soft_cap"],
                    final_logit_soft_cap=GEMMA2_FEATURES["final_logit_soft_cap"])
    if arch != "gemma3":
        dims["ffw_dim"] = dims.pop("intermediate_dim") // 2
        return dims
    window = dims.pop("sliding_window_size")
    dims["ffw_dim"] = dims.pop("intermediate_dim")
    # Gemma3Backbone's layout: layers 0-4 of every 6 slide (RoPE 1e4), the 6th is global (1e6).
    layers = [(window, 10_000.0, 1.0) if i % 6 < 5 else (0, 1_000_000.0, 1.0) for i in range(dims["num_layers"])]
    return dict(dims, query_key_norm=True, post_attention_norm=True, post_ffw_norm=True,
                layer_attention=tuple(layers))

# name -> (kind, batch, options). Options of "fast" variants are FastConfig
# fields; "cache" shares a persistent compilation cache between variants.
VARIANTS = {
    "classic": ("keras", 1, {"dtype": "float32"}),
    "keras_bf16": ("keras", 8, {"dtype": "bfloat16"}),
    "fast": ("fast", 8, {"cache": "cold"}),
    "fast_warm_cache": ("fast", 8, {"cache": "warm"}),
    "fast_scan_layers": ("fast", 8, {"scan_layers": True}),
    "fast_xla_attention": ("fast", 8, {"attention": "xla"}),
    "fast_no_attention_cap": ("fast", 8, {"attention_logit_soft_cap": None}),
    "fast_attention_chunk_512": ("fast", 8, {"attention_chunk": 512}),
    "fast_dense_mask": ("fast", 8, {"mask_form": "dense"}),
    "fast_no_segment_mask": ("fast", 8, {"mask_form": "none"}),
    "fast_remat_gate": ("fast", 8, {"remat": "gate"}),
    "fast_remat_ffn": ("fast", 8, {"remat": "ffn"}),
    "fast_remat_layer": ("fast", 8, {"remat": "layer"}),
    "fast_chunk_512": ("fast", 8, {"loss_chunk": 512}),
    "fast_logits_bf16": ("fast", 8, {"logits_dtype": "bfloat16"}),
    "fast_no_triton_gemm": ("fast", 8, {"xla_flags": "--xla_gpu_enable_triton_gemm=false"}),
    "fast_chunk_4096": ("fast", 8, {"loss_chunk": 4096}),
    "fast_b32": ("fast", 32, {}),
    # Where the fast step's time goes: the same work split in parts.
    "part_forward": ("fast", 8, {"part": "forward"}),
    "part_backbone": ("fast", 8, {"part": "backbone"}),
    "part_head": ("fast", 8, {"part": "head"}),
    "fast_b32_remat_gate": ("fast", 32, {"remat": "gate"}),
    "fast_b32_remat_layer": ("fast", 32, {"remat": "layer"}),
}
# The CPU smoke run times one variant of each kind; a GPU run times them all.
DEFAULT_VARIANTS = {"tiny": "classic,fast", "gemma_2b": ",".join(VARIANTS),
                    "tiny_gemma3": "classic,fast", "gemma3_270m": "classic,keras_bf16,fast", "gemma3_1b": "classic,keras_bf16,fast",
                    "tiny_gemma2": "classic,fast,fast_no_attention_cap",
                    "gemma2_2b": "classic,keras_bf16,fast,fast_no_attention_cap,fast_attention_chunk_512,fast_remat_layer"}


def _peak_gib():
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None  # CPU devices do not report memory
    return stats["peak_bytes_in_use"] / 2**30


def _random_rows(batch, seq, vocab, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, seq + 1)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def _run_keras(shape, batch, seq, steps, warmup, dtype):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    lm = keras_causal_lm(shape, dtype)
    lm.backbone.enable_lora(4)
    optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    rows = batch * steps
    ids, labels = _random_rows(rows, seq, SHAPES[shape]["vocabulary_size"], 0)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    weights = np.ones(labels.shape, "float32")

    def fit(n):
        part = {k: v[: n * batch] for k, v in x.items()}
        lm.fit(
            part,
            labels[: n * batch],
            sample_weight=weights[: n * batch],
            batch_size=batch,
            epochs=1,
            verbose=0,
            shuffle=False,
        )

    start = time.perf_counter()
    fit(1)
    first = time.perf_counter() - start
    if warmup:
        fit(warmup)
    start = time.perf_counter()
    fit(steps)  # fit syncs with the device before returning its logs
    elapsed = time.perf_counter() - start
    return {"first_step_s": first, "step_s": elapsed / steps, "cudnn": None}


def _run_fast(shape, batch, seq, steps, warmup, options):
    import jax
    import numpy as np

    cache = options.pop("cache", None)
    if cache:
        jax.config.update("jax_compilation_cache_dir", os.environ["BENCH_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import fast_trainer

    from gemma_lora.fast import extract

    dims = fast_dims(shape)
    options.pop("xla_flags", None)  # read by XLA from the environment
    part = options.pop("part", None)
    config = extract.FastConfig(**{**dims, **options}).validate()  # a variant may override the shape's cap
    frozen, lora = fast_trainer.init_params(config, jax.random.key(0))
    ids, labels = _random_rows(batch, seq, dims["vocabulary_size"], 0)
    # Four packed examples per row, no padding: the segment mask is in play.
    quarter = seq // 4
    segments = np.minimum(np.arange(seq) // quarter, 3) + 1
    positions = np.arange(seq) - (segments - 1) * quarter
    weights = np.ones((batch, seq), "float32")
    weights[:, np.r_[quarter - 1 : seq : quarter]] = 0.0  # last token of each example
    data = {
        "token_ids": ids,
        "segment_ids": np.tile(segments, (batch, 1)).astype("int32"),
        "positions": np.tile(positions, (batch, 1)).astype("int32"),
        "labels": labels,
        "loss_weights": weights,
    }
    data = jax.device_put(data)
    step = fast_trainer.make_train_step(config, fast_trainer.AdamW(learning_rate=5e-5, weight_decay=0.01))
    opt_state = step.init(lora)
    if part:
        return _time_part(part, config, frozen, lora, data, steps, warmup)

    start = time.perf_counter()
    compiled = step._step.lower(frozen, lora, opt_state, data).compile()
    lora, opt_state, sums = compiled(frozen, lora, opt_state, data)
    jax.block_until_ready(sums)
    first = time.perf_counter() - start
    hlo = compiled.as_text()
    for _ in range(warmup):
        lora, opt_state, sums = compiled(frozen, lora, opt_state, data)
    jax.block_until_ready((lora, sums))
    start = time.perf_counter()
    for _ in range(steps):
        lora, opt_state, sums = compiled(frozen, lora, opt_state, data)
    jax.block_until_ready((lora, sums))
    elapsed = time.perf_counter() - start
    loss = float(sums["nll_sum"] / sums["weight_sum"])
    return {
        "first_step_s": first,
        "step_s": elapsed / steps,
        "cudnn": "cudnn" in hlo.lower(),
        "loss": loss,
    }


def _time_part(part, config, frozen, lora, data, steps, warmup):
    """Time one part of the step: "forward" (loss, no gradient), "backbone"
    (layers forward + backward, no vocabulary projection) or "head" (the
    chunked loss and its gradient on fixed hidden states)."""
    import jax
    import jax.numpy as jnp

    from gemma_lora.fast import forward

    if part == "forward":
        fn = jax.jit(lambda lora, frozen: forward.loss_sums(config, frozen, lora, data))
        arg = lora
    elif part == "backbone":

        def backbone(lora, frozen):
            h = forward.hidden_states(
                config, frozen, lora, data["token_ids"], data["segment_ids"], data["positions"]
            )
            return jnp.mean(h.astype(jnp.float32))

        fn, arg = jax.jit(jax.grad(backbone)), lora
    else:
        d = config.hidden_dim

        def head(h, frozen):
            return forward._lm_nll(
                h, frozen["embedding"], data["labels"].reshape(-1),
                data["loss_weights"].reshape(-1), config.loss_chunk,
                jnp.dtype(config.logits_dtype), config.final_logit_soft_cap,
            )

        fn = jax.jit(jax.grad(head))
        arg = jax.random.normal(jax.random.key(1), (data["labels"].size, d), jnp.bfloat16)
    # Weights and data are arguments: a closure would bake them into the
    # compiled program as constants.
    start = time.perf_counter()
    jax.block_until_ready(fn(arg, frozen))
    first = time.perf_counter() - start
    for _ in range(warmup):
        out = fn(arg, frozen)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(arg, frozen)
    jax.block_until_ready(out)
    return {"first_step_s": first, "step_s": (time.perf_counter() - start) / steps, "cudnn": None}


def run_child(args):
    kind, batch, options = VARIANTS[args.child]
    batch = args.batch_override or batch
    if kind == "keras":
        result = _run_keras(args.shape, batch, args.seq, args.steps, args.warmup, **options)
    else:
        result = _run_fast(args.shape, batch, args.seq, args.steps, args.warmup, dict(options))
        result["options"] = {k: v for k, v in options.items() if k != "cache"}
    import jax

    result.update(
        variant=args.child,
        kind=kind,
        batch=batch,
        tokens_per_s=batch * args.seq / result["step_s"],
        peak_gib=_peak_gib(),
        device=jax.devices()[0].device_kind,
    )
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ dolly


def _dolly_path():
    shared = ROOT.parent / "shared" / "data" / "databricks-dolly-sample.jsonl"
    return shared if shared.exists() else ROOT / "gemma_lora" / "resources" / "databricks-dolly-sample.jsonl.gz"


def dolly_fractions(seq):
    """Real-token shares of Dolly no-context rows: padded vs packed."""
    import numpy as np
    import sentencepiece

    from gemma_lora.data.packing import pack, real_token_fraction

    path = _dolly_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        records = [json.loads(line) for line in f]
    rows = [r for r in records if not r["context"]]
    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(ROOT / "gemma_lora" / "resources" / "tiny_vocab.spm")
    )
    examples = []
    for r in rows:
        prompt = sp.encode(f"Instruction:\n{r['instruction']}\n\nResponse:\n")
        response = sp.encode(r["response"])
        ids = [sp.bos_id()] + prompt + response + [sp.eos_id()]
        # Weight at position i scores token i+1: response tokens and <eos>.
        weights = [0.0] * (len(prompt) + 1) + [1.0] * (len(response) + 1)
        examples.append((ids, weights[1:] + [0.0]))
    lengths = np.array([len(e[0]) for e in examples])
    packed = pack(examples, seq)
    padded = np.minimum(lengths, seq).sum() / (len(lengths) * seq)
    return {
        "source": str(path.name),
        "rows": len(rows),
        "mean_len": float(lengths.mean()),
        "median_len": float(np.median(lengths)),
        "p90_len": float(np.percentile(lengths, 90)),
        "max_len": int(lengths.max()),
        "over_seq": int((lengths > seq).sum()),
        "padded_fraction": float(padded),
        "packed_fraction": real_token_fraction(packed),
        "packed_rows": int(packed["token_ids"].shape[0]),
        "response_share": float(packed["loss_weights"].sum() / (packed["segment_ids"] > 0).sum()),
    }


# ------------------------------------------------------------------ parent


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; 5 on tiny)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument(
        "--variants",
        help=f"comma-separated names from {sorted(VARIANTS)}; default: all on "
        "gemma_2b, classic,fast on tiny",
    )
    parser.add_argument("--data", choices=["dolly"], help="also measure Dolly padding vs packing")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--json-out", help="write all results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch-override", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 5 if args.shape.startswith("tiny") else 20
    if args.child:
        return run_child(args)

    fractions = dolly_fractions(args.seq) if args.data == "dolly" else None
    if fractions:
        print("dolly (proxy tokenizer: tiny 1,024-piece SentencePiece):", json.dumps(fractions))
    names = [n.strip() for n in (args.variants or DEFAULT_VARIANTS[args.shape]).split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")

    results = []
    env = dict(os.environ, BENCH_CACHE_DIR=tempfile.mkdtemp(prefix="bench-cache-"))
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--shape", args.shape,
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        start = time.perf_counter()
        try:
            flags = VARIANTS[name][2].get("xla_flags")
            child_env = dict(env, XLA_FLAGS=flags) if flags else env
            proc = subprocess.run(
                command, capture_output=True, text=True, env=child_env, timeout=args.timeout
            )
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = f"timed out after {args.timeout} s " + str(e.stdout or "")[-200:]
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if line:
            result = json.loads(line[len("RESULT "):])
        else:
            tail = [x for x in out.splitlines() if x.strip()][-3:]
            result = {"variant": name, "batch": VARIANTS[name][1], "error": " | ".join(tail)[-300:]}
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        print(json.dumps(result), flush=True)

    classic = next((r for r in results if r["variant"] == "classic" and "error" not in r), None)
    print()
    print("| variant | batch | tok/s | useful tok/s | step ms | peak GiB | first step s | cuDNN attn | x classic |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['batch']} | failed: {r['error']} | | | | | | |")
            continue
        share = 1.0
        if fractions:
            share = fractions["padded_fraction" if r["kind"] == "keras" else "packed_fraction"]
        ratio = r["tokens_per_s"] / classic["tokens_per_s"] if classic else None
        cudnn = {None: "—", True: "yes", False: "no"}[r["cudnn"]]
        print(
            f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] * share:,.0f} | {r['step_s'] * 1e3:.1f} | "
            f"{_fmt(r['peak_gib'], '.1f')} | {r['first_step_s']:.1f} | {cudnn} | "
            f"{_fmt(ratio, '.2f')} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"dolly": fractions, "results": results}, indent=1))


if __name__ == "__main__":
    main()
