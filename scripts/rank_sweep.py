"""LoRA rank sweep: one adapter per rank on the same data, order and seed.

    python scripts/rank_sweep.py --ranks 4 8 16 --max-steps 20 --output-dir runs/sweep
    python scripts/rank_sweep.py --preset tiny --ranks 2 4 --max-steps 2 --sequence-length 64

The same as `gemma-lora sweep` (every training flag works; `--alpha` holds
alpha fixed, `--alpha-per-rank` holds alpha/rank fixed). The default preset is
`demo`, the real Gemma 3 270M. Running the same command again resumes the sweep:
finished ranks are read back, not retrained. Writes OUTPUT_DIR/rank-N/ (one
run directory per rank), results.csv/.json/.md, plot.png and samples.md.
"""

import sys

from gemma_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
