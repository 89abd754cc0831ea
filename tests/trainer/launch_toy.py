"""`projsweep train` on the toy features, for `accelerate launch` (see test_accelerate_launch.py).

Usage: launch_toy.py CONFIG.yaml OUT_DIR [--set key=value]…
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from trial_toy import toy_splits

import trainer.loop as loop
from orchestration.cli import main

if __name__ == "__main__":
    splits = toy_splits(128, 20)
    loop.load_features = lambda cfg: splits
    sys.exit(main(["train", sys.argv[1], "--out", sys.argv[2], *sys.argv[3:]]))
