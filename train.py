"""Entry point for `accelerate launch train.py --config RECIPE_OR_YAML [key=value ...]`.

Same as `dinov2-hf train`; see dinov2_hf/training/trainer.py for the data path to the loss.
"""

import sys

from dinov2_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
