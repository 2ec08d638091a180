"""Residual vs HC vs mHC (n = 4) on a Llama-style byte model, at two learning rates: curves and the gain.

    python benchmarks/study.py                       # on one GPU: the defaults, about 6-8 minutes on an H200
    python benchmarks/study.py --steps 20 --depth 4 --width 64   # CPU smoke test, under a minute

Writes benchmarks/results/study-<gpu>.md (command, environment, the table), a JSON beside it
with every curve, and docs/study.png. Also `mhc-compile study` with the same options. The code,
what is recorded, the definitions (gain, spikes) and the time estimate with its basis are in
mhc_compile/study.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mhc_compile.study import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
