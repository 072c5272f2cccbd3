"""lm-eval `model_args` for the flexhelm backend, read through the engine's own command-line options.

Every policy option the engine's CLIs take (engine.flags, generated from `Policy`'s fields) is a key
here, spelled with underscores: `gpu_batch_size=4`, `cpu_cache_compute=true`, `compress=both`,
`comp_bits=4`, `gpu_mem=16GiB`, `offload_dir=...`, `policy=auto`. FlexGen's six numbers come as
`percent=WG;WC;CG;CC;HG;HC`, because lm-eval splits model_args at commas. Translating the keys into
flags and parsing them with engine.flags's parser means a new Policy field is a key here too.
"""

from __future__ import annotations

import argparse

from engine.errors import UserError
from engine.flags import ArgumentParser, add_policy_args, policy_from_args
from engine.policy import Policy

# keys that are not engine flags: the model, and what lm-eval itself passes to every backend
MODEL_KEYS = ("pretrained", "weights", "seed", "max_length")
LM_EVAL_KEYS = ("batch_size", "max_batch_size", "device")
# lm-eval's --policy auto plans for the workload harness.run plans for
AUTO_PROMPT_LEN, AUTO_GEN_LEN = 512, 32


class _Parser(ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"flexhelm model_args: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flexhelm", add_help=False)
    add_policy_args(parser)
    return parser


def engine_keys() -> list[str]:
    """Every policy key model_args accepts (a flag `--x-y` is the key `x_y`)."""
    return sorted({opt[2:].replace("-", "_") for action in _parser()._actions for opt in action.option_strings
                   if opt.startswith("--") and not opt.startswith("--no-")})


def _flags(options: dict) -> list[str]:
    known = set(engine_keys())
    argv = []
    for key, value in options.items():
        if key not in known:
            raise UserError(f"flexhelm model_args: unknown key {key!r}; use one of "
                            f"{', '.join(MODEL_KEYS + tuple(known))}")
        flag = "--" + key.replace("_", "-")
        if key == "percent":
            argv += [flag, *str(value).replace(";", " ").split()]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def parse_options(options: dict) -> argparse.Namespace:
    """The engine options of model_args (model keys removed) as engine.flags parses its flags."""
    return _parser().parse_args(_flags(options))


def policy_of(model_args: dict) -> Policy:
    """The Policy model_args describe, without resolving policy=auto (for labels of stored outputs)."""
    return policy_from_args(parse_options({k: v for k, v in model_args.items()
                                           if k not in MODEL_KEYS + LM_EVAL_KEYS}))
