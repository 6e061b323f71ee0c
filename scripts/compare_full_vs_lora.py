"""Full fine-tune (every weight trainable) vs LoRA at one rank, same data and steps.

    python scripts/compare_full_vs_lora.py --lora-rank 8 --max-steps 20 --output-dir runs/full-vs-lora
    python scripts/compare_full_vs_lora.py --preset tiny --max-steps 2 --sequence-length 64

The same as `gemma-lora compare` (every training flag works). Both variants go
through the same pipeline: OUTPUT_DIR/lora-rN holds the adapter, OUTPUT_DIR/full
the whole fine-tuned model as a KerasHub preset. Reports trainable parameters,
train time, peak memory and validation loss (results.md) and a bar plot
(plot.png). The default preset is `demo`; on a CPU only tiny, demo or a local
preset directory are allowed, on a GPU any preset.
"""

import sys

from gemma_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
