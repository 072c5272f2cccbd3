"""The GPU issue's checks as one command from the repository root: `python scripts/gpu_bench.py [--cpu]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench.gpu_bench import main  # noqa: E402 - the repository root is on the path only from here

sys.exit(main())
