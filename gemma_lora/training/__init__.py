"""The training stage: one `Run` (run.py) drives setup → score_before → fit → score_after → save.

run.py          the Run and `train(config)`
prepare.py      data, chat format, model, LoRA and tokenized splits for a run
objectives.py   what a training objective is to the loop; SFT
engines.py      the Keras engine and the fast engine, chosen once; their batch plans; `fit`
keras_engine.py / fast_engine.py   each engine's jitted step
batching.py     length-bucketed batches of rows (Keras engine, scoring)
loop.py         the one loop: accumulation, evaluations, max_steps, callbacks
checkpoints.py  checkpoints and keep-best
scoring.py      held-out token losses; the one cross-entropy on logits
optim.py        AdamW, schedules, clipping
run_logs.py     progress, metrics.csv, evaluations.csv, TensorBoard
reports.py      answers, samples and the phases' times
"""
