"""Issue 2: user errors give one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], capture_output=True, text=True,
                          timeout=180)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def broken(tiny_models, tmp_path):
    def make(kind: str):
        folder = tmp_path / kind
        shutil.copytree(tiny_models["opt"], folder)
        weights = folder / "model.safetensors"
        if kind == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif kind == "unknown-arch":
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
        elif kind == "no-hidden-size":
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
        elif kind == "truncated-config":
            text = (folder / "config.json").read_text()
            (folder / "config.json").write_text(text[: len(text) // 2])
        return str(folder)

    return make


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path / "nope"), "--prompt-ids", "1,2"), "does not exist")


def test_truncated_checkpoint(broken):
    assert_one_line_error(run_cli("--model", broken("truncated"), "--prompt-ids", "1,2"), "corrupt or truncated")


@pytest.mark.parametrize("kind,needle", [("no-hidden-size", "required field 'hidden_size' is missing"),
                                         ("truncated-config", "not valid JSON")])
def test_a_damaged_config_json_names_the_file(broken, kind, needle):
    folder = broken(kind)
    proc = run_cli("--model", folder, "--prompt-ids", "1,2,3")
    assert_one_line_error(proc, needle)
    assert f"{folder}/config.json" in proc.stderr


def test_unknown_architecture(broken):
    assert_one_line_error(run_cli("--model", broken("unknown-arch"), "--prompt-ids", "1,2"), "'mamba'")


def test_bad_policy_value(tiny_models):
    proc = run_cli("--model", str(tiny_models["opt"]), "--prompt-ids", "1,2", "--percent", "80", "30", "100", "0",
                   "100", "0")
    assert_one_line_error(proc, "sum to 110")


def test_prompt_longer_than_context(tiny_models):
    ids = ",".join(["5"] * 126)
    assert_one_line_error(run_cli("--model", str(tiny_models["opt"]), "--prompt-ids", ids), "context of 128")


def test_json_output_has_outputs_and_stats(tiny_models):
    proc = run_cli("--model", str(tiny_models["llama"]), "--prompt-ids", "1,2,3", "--prompt-ids", "4,5",
                   "--max-new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [len(o["token_ids"]) for o in out["outputs"]] == [3, 3]
    assert set(out["outputs"][0]) == {"text", "token_ids", "logprobs", "finish_reason"}
    assert out["stats"]["generated_tokens"] == 6 and set(out["stats"]["peak_bytes"]) == {"gpu", "cpu", "disk"}
