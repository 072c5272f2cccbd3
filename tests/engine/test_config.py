"""A damaged config.json (a truncated download, a hand edit) is one line naming the file and what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.config import load_folder_config
from engine.errors import UserError

# What each family's shapes are built from; written out here so a field dropped from the engine's check shows.
REQUIRED = {"opt": ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                    "max_position_embeddings"],
            "llama": ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]}


def _folder_with(tiny_models, tmp_path, family: str, edit) -> tuple:
    folder = tmp_path / family
    shutil.copytree(tiny_models[family], folder)
    path = folder / "config.json"
    hf = json.loads(path.read_text())
    path.write_text(edit(hf) if callable(edit) else edit)
    return folder, path


def _message(folder) -> str:
    with pytest.raises(UserError) as err:
        load_folder_config(folder)
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("family,field", [(f, k) for f, keys in REQUIRED.items() for k in keys])
def test_a_missing_required_field_is_named_with_the_file(tiny_models, tmp_path, family, field):
    folder, path = _folder_with(tiny_models, tmp_path, family,
                                lambda hf: json.dumps({k: v for k, v in hf.items() if k != field}))
    text = _message(folder)
    assert text.startswith(f"{path}: required field {field!r} is missing"), text


@pytest.mark.parametrize("value", [None, "32", 0, 32.5, True])
def test_a_malformed_size_is_named_with_the_file(tiny_models, tmp_path, value):
    folder, path = _folder_with(tiny_models, tmp_path, "llama", lambda hf: json.dumps({**hf, "hidden_size": value}))
    text = _message(folder)
    assert text.startswith(f"{path}: field 'hidden_size' must be a positive integer, got {value!r}"), text


@pytest.mark.parametrize("content,why", [('{"model_type": "opt", "hidden_si', "not valid JSON"),
                                         ('["opt"]', "expected a JSON object, got list"),
                                         (b"\xff\xfe\x00", "not valid JSON (not UTF-8 text)")],
                         ids=["truncated", "not-an-object", "binary"])
def test_an_unreadable_config_is_named_with_the_file(tiny_models, tmp_path, content, why):
    folder, path = _folder_with(tiny_models, tmp_path, "opt", "{}")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    text = _message(folder)
    assert text.startswith(f"{path}: {why}"), text


def test_a_truncated_generation_config_is_named_with_the_file(tiny_models, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, ')
    assert _message(folder).startswith(f"{folder / 'generation_config.json'}: not valid JSON")


def test_an_intact_config_still_loads(tiny_models):
    assert load_folder_config(tiny_models["llama"]).kv_heads == 2
    assert load_folder_config(tiny_models["opt"]).hidden == 32
