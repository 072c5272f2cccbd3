"""The policy flags are generated from Policy's fields: each field is reachable, shorthands yield to specific flags."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from engine.flags import ArgumentParser, add_policy_args, policy_from_args
from engine.policy import Policy


def parse(*argv: str) -> Policy:
    parser = ArgumentParser(prog="test")
    add_policy_args(parser)
    return policy_from_args(parser.parse_args(list(argv)))


def test_no_flags_give_the_default_policy() -> None:
    assert parse() == Policy()


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(Policy) if f.metadata.get("cli", True)],
                         ids=lambda f: f.name)
def test_every_policy_field_has_a_flag_that_sets_it(field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    if isinstance(field.default, bool):
        argv, expected = ([f"--no-{flag[2:]}"], False) if field.default else ([flag], True)
    else:
        value = {"compute_dtype": "bf16", "storage_dtype": "fp16", "comp_weight_dim": 0, "comp_weight_fit": "mse",
                 "comp_cache_keys": "token", "threads": 3}.get(
            field.name, field.default + 1 if isinstance(field.default, int) else None)
        argv, expected = [flag, str(value)], value
    assert getattr(parse(*argv), field.name) == expected


def test_shorthands_set_weights_and_cache_and_yield_to_specific_flags() -> None:
    both = parse("--comp-bits", "3", "--comp-group", "32")
    assert (both.comp_weight_bits, both.comp_cache_bits) == (3, 3)
    assert (both.comp_weight_group, both.comp_cache_group) == (32, 32)
    mixed = parse("--comp-bits", "3", "--comp-cache-bits", "8", "--comp-weight-group", "128", "--comp-group", "32")
    assert (mixed.comp_weight_bits, mixed.comp_cache_bits) == (3, 8)
    assert (mixed.comp_weight_group, mixed.comp_cache_group) == (128, 32)


def test_percent_compress_and_alias() -> None:
    p = parse("--percent", "20", "80", "0", "100", "0", "100", "--compress", "both", "--comp-dim", "0")
    assert p.percent == (20, 80, 0, 100, 0, 100)
    assert p.compress_weight and p.compress_cache and p.comp_weight_dim == 0


def test_usage_errors_are_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--model", "opt-125m", "--percent", "1", "2", "3",
                           "4", "5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--percent" in proc.stderr


def test_help_shows_policy_defaults() -> None:
    parser = ArgumentParser(prog="test")
    add_policy_args(parser)
    text = parser.format_help()
    assert "(default: 64)" in text and "(default: 8)" in text
