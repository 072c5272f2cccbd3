"""lm-eval's own command line with the `flexhelm` backend registered and this project's offline tasks found.

    python -m harness.lm_eval --model flexhelm --model_args pretrained=smollm2-135m,percent=0;0;100;0;100;0 \
        --tasks flexhelm_mmlu_abstract_algebra --limit 20 --output_path results/lm_eval --log_samples

Every argument is lm-eval's (`python -m harness.lm_eval run --help`). One addition: without
`--include_path`, the task folder scenarios/lm_eval is included, so its offline tasks need no flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import cli_main

TASKS_DIR = Path(__file__).resolve().parents[1] / "scenarios" / "lm_eval"


def argv_with_tasks(argv: list[str]) -> list[str]:
    """`argv` with --include_path TASKS_DIR added to a run that names none (other subcommands untouched)."""
    if "--include_path" in argv or any(a.startswith("--include_path=") for a in argv):
        return argv
    if argv and argv[0] in ("ls", "validate"):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


@cli_main
def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import harness.lm_eval_backend  # noqa: F401  registers flexhelm

    args = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *(argv_with_tasks(args) if len(args) > 1 else args)]
    cli_evaluate()


if __name__ == "__main__":
    main()
