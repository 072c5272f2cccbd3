"""harness.view: HELM's summarize step and web UI over a harness output, each compression variant its own model.

The input is a real harness output: the smoke suite on a tiny random LLaMA (SmolLM2's tokenizer), one instance
per run, uncompressed and 4-bit (--compare-compression). Every value the UI shows is checked against the run's
own files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.paths import HELM_DATA

from engine.policy import Policy
from harness.helm.deployment import EngineSpec, variant_name
from harness.report.runs import load_report

REPO = Path(__file__).resolve().parents[2]
RELEASE_URL = "/benchmark_output/releases/flexhelm"


@pytest.fixture(scope="module")
def smoke_out(tiny_llama, tmp_path_factory) -> Path:
    """The smoke suite, uncompressed and w4c4, one instance per run."""
    if not (HELM_DATA / "mmlu").is_dir():
        pytest.skip(f"offline HELM data not found at {HELM_DATA} (../shared/data)")
    from harness.run import main

    out = tmp_path_factory.mktemp("view") / "smoke"
    assert main(["--suite", "smoke", "--model", str(tiny_llama), "--data-dir", str(HELM_DATA),
                 "--max-eval-instances", "1", "--compare-compression", "--output", str(out)]) == 0
    return out


def _json(path: Path):
    return json.loads(path.read_text())


def _stat(run: Path, metric: str, split: str = "test") -> float:
    (mean,) = [s["mean"] for s in _json(run / "stats.json")
               if s["name"] == {"name": metric, "split": split}]
    return mean


def test_variant_names_are_derived_from_the_compression_policy():
    policies = [Policy(), Policy(compress_weight=True, compress_cache=True),
                Policy(compress_cache=True, comp_cache_bits=2),
                Policy(compress_weight=True, comp_weight_group=128, comp_weight_dim=0), Policy(compress_weight=True),
                Policy(compress_weight=True, comp_weight_fit="mse"),
                Policy(compress_weight=True, compress_cache=True, comp_weight_fit="minmax", comp_cache_keys="token")]
    names = [variant_name(p) for p in policies]
    assert names == ["", "w4c4", "c2", "w4g128dim0", "w4", "w4mse", "w4minmaxc4token"]
    defaults = [*policies[1:3], policies[4]]  # default groups and fit: the label output folders and reports use
    assert [variant_name(p) for p in defaults] == [p.compression_label() for p in defaults]
    deployments = {EngineSpec.create("smollm2-135m", None, p).deployment for p in policies}
    assert len(deployments) == len(policies) and "flexhelm/smollm2-135m" in deployments
    moved = Policy(compress_weight=True, w_gpu_percent=0, w_cpu_percent=100, gpu_batch_size=2)
    assert EngineSpec.create("x", None, moved).deployment == "flexhelm/x-w4"  # placement never names a model


def test_summary_lists_both_variants_as_models_with_their_metrics(smoke_out):
    from harness.helm.summarize import summarize

    originals = {p: sorted(f.name for f in p.iterdir()) for p in smoke_out.glob("*/runs/smoke/*:*")}
    site = summarize(smoke_out)
    deployments = sorted(_json(smoke_out / v / "manifest.json")["deployment"] for v in ("none", "w4c4"))
    assert deployments[0] != deployments[1] and list(site.models) == deployments
    release = site.benchmark_output / "releases" / "flexhelm"
    assert _json(release / "summary.json")["suites"] == ["smoke"]
    assert sorted(m["name"] for m in _json(release / "schema.json")["models"]) == deployments

    report = load_report(smoke_out).set_index("run")
    assert len(report) == 6
    shown = set()
    for group in ("mmlu", "gsm", "synthetic_reasoning"):
        (table, *_) = _json(release / "groups" / f"{group}.json")
        assert table["header"][2]["value"] == "Observed inference time (s)"
        assert len(table["rows"]) == 2  # one row per variant, never merged
        for row in table["rows"]:
            (run,) = row[0]["run_spec_names"]
            run_dir = smoke_out / report.loc[run, "path"]
            assert row[1]["value"] == pytest.approx(report.loc[run, "value"])  # the headline report.md shows
            assert row[2]["value"] == pytest.approx(_stat(run_dir, "inference_runtime"))
            shown.add(run)
    assert shown == set(report.index)
    # the runs themselves stay as the harness wrote them; HELM's display files sit in the staged tree
    assert {p: sorted(f.name for f in p.iterdir()) for p in originals} == originals
    assert all((site.benchmark_output / "runs" / "smoke" / run / "display_predictions.json").is_file()
               for run in report.index)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_server_serves_the_ui_and_the_summary_on_loopback(smoke_out, capsys):
    from harness.view import main

    port = _free_port()
    cmd = [sys.executable, "-m", "harness.view", str(smoke_out), "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                index = _get(base + "/").decode()
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "the server did not answer in 180 s"
                time.sleep(0.5)
        assert '<div id="root">' in index and "config.js" in index
        assert 'window.RELEASE = "flexhelm"' in _get(base + "/config.js").decode()
        assert json.loads(_get(base + RELEASE_URL + "/summary.json"))["suites"] == ["smoke"]
        models = [m["name"] for m in json.loads(_get(base + RELEASE_URL + "/schema.json"))["models"]]
        assert len(models) == 2 and all(m.startswith("flexhelm/tiny-llama") for m in models)

        with pytest.raises(SystemExit) as busy:  # refused before any summarizing
            main([str(smoke_out), "--port", str(port)])
        assert busy.value.code == 1
        expected = f"error: port {port} is in use; pass another --port (e.g. --port {port + 1})\n"
        assert capsys.readouterr().err == expected
    finally:
        server.terminate()
        server.communicate(timeout=30)
    with pytest.raises(OSError):
        _get(base + "/")


def test_export_writes_a_static_site(smoke_out, tmp_path):
    from harness.view import main

    site = tmp_path / "site"
    assert main([str(smoke_out), "--export", str(site)]) == 0
    assert '<div id="root">' in (site / "index.html").read_text()
    config = (site / "config.js").read_text()
    assert 'BENCHMARK_OUTPUT_BASE_URL = "benchmark_output"' in config and 'RELEASE = "flexhelm"' in config
    assert _json(site / "benchmark_output" / "releases" / "flexhelm" / "summary.json")["suites"] == ["smoke"]
    stats = list((site / "benchmark_output" / "runs" / "smoke").glob("*/stats.json"))
    assert len(stats) == 6 and not any(p.is_symlink() for p in stats)  # a copy, viewable without OUT
    assert (site / "assets").is_dir() and (site / "benchmark_output/releases/flexhelm/schema.json").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "is not a folder; pass the --output folder of a harness run"),
    (lambda tmp: tmp, "holds no HELM runs"),
])
def test_a_wrong_output_folder_is_one_line(tmp_path, capsys, make, message):
    from harness.view import main

    with pytest.raises(SystemExit) as exit_:
        main([str(make(tmp_path)), "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and message in err and err.count("\n") == 1


def test_export_refuses_a_folder_in_use(smoke_out, tmp_path, capsys):
    from harness.view import main

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main([str(smoke_out), "--export", str(tmp_path / "site")])
    assert "is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "site" / "mine.txt").read_text() == "keep"
