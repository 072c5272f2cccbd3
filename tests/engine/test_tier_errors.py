"""Budgets, full disks and unusable offload folders: refused in one line that says what to change, leaving nothing.

Every message here is what a user sees after `error: ` on the command line, so each test checks it is
one line, names the tier or folder at fault, and points at the option that fixes it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import Engine, Policy, UserError
from engine.policy import TIERS

ALL_CPU = Policy().with_percent(0, 100, 100, 0, 100, 0)
ALL_DISK = Policy().with_percent(0, 0, 0, 0, 0, 0)
BLOCK = Policy(gpu_batch_size=32)
CACHE_ON = {"gpu": BLOCK, "cpu": BLOCK.with_percent(100, 0, 0, 100, 100, 0),
            "disk": BLOCK.with_percent(100, 0, 0, 0, 100, 0)}
LONG = [[1] * 100] * 32  # one block of 32 rows of 100 tokens: with 20 new tokens, a KV cache of 1.9 MiB
# Room for the model and a short prompt's block, but not for LONG's cache (the gpu tier also computes).
FITS_A_SHORT_BLOCK = {"gpu": {"gpu_mem": "6MiB"}, "cpu": {"cpu_mem": "1MiB"}, "disk": {"disk_mem": "1MiB"}}
# Room for the model alone: what a block's cache and activations take on the tier must overflow it.
FITS_THE_MODEL = {"gpu": {"gpu_mem": "1MiB"}, "cpu": {"cpu_mem": "64KiB"}, "disk": {"disk_mem": "64KiB"}}
SHORT = [[1, 2, 3]]


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


def nothing_left(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# -- budgets at load ---------------------------------------------------------------------------------

def test_cpu_budget_refused_at_load(tiny_models, tmp_path):
    with pytest.raises(UserError) as err:
        Engine.load(tiny_models["opt"], policy=ALL_CPU, cpu_mem="1KiB", offload_dir=tmp_path / "offload")
    text = one_line(err)
    assert text.startswith("opt does not fit: cpu needs ") and "> budget 1.0 KiB" in text, text
    assert "gpu needs" not in text and "disk needs" not in text and "--cpu-mem" in text
    assert not (tmp_path / "offload").exists()


def test_disk_budget_refused_at_load_creates_no_offload_folder(tiny_models, tmp_path):
    """A refused load leaves no trace, not even the folder it was told to use (DiskTier makes it lazily)."""
    offload = tmp_path / "nvme" / "offload"
    with pytest.raises(UserError) as err:
        Engine.load(tiny_models["opt"], policy=ALL_DISK, disk_mem="1KiB", offload_dir=offload)
    text = one_line(err)
    assert text.startswith("opt does not fit: disk needs ") and "> budget 1.0 KiB" in text, text
    assert "--offload-dir" in text
    assert not (tmp_path / "nvme").exists()


def test_offload_folder_is_made_when_first_needed_and_removed_with_the_parents_it_made(tiny_models, tmp_path):
    offload = tmp_path / "nvme" / "offload"
    with Engine.load(tiny_models["opt"], offload_dir=offload):  # everything on the gpu tier: no file needed
        assert not (tmp_path / "nvme").exists()
    with Engine.load(tiny_models["opt"], policy=ALL_DISK, offload_dir=offload) as eng:
        assert eng.offload_folder.parent == offload and any(eng.offload_folder.iterdir())
    assert not (tmp_path / "nvme").exists()
    # a parent that holds something else by then stays, with it
    with Engine.load(tiny_models["opt"], policy=ALL_DISK, offload_dir=offload):
        (tmp_path / "nvme" / "keep.txt").write_text("not the engine's")
    assert [p.name for p in (tmp_path / "nvme").iterdir()] == ["keep.txt"]
    # a process that exits without closing removes what it made as well
    fresh = tmp_path / "fresh" / "offload"
    code = (f"from engine import Engine, Policy; Engine.load({str(tiny_models['opt'])!r}, "
            f"policy=Policy().with_percent(0,0,0,0,0,0), offload_dir={str(fresh)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not (tmp_path / "fresh").exists()


# -- budgets at run time -------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", TIERS)
def test_a_block_whose_kv_cache_does_not_fit_is_refused_before_it_runs(tiny_models, tmp_path, tier):
    with Engine.load(tiny_models["opt"], policy=CACHE_ON[tier], offload_dir=tmp_path,
                     **FITS_A_SHORT_BLOCK[tier]) as eng:
        loaded = {t: eng.held_bytes[t] for t in TIERS}
        with pytest.raises(UserError) as err:
            eng.generate(LONG, max_new_tokens=20)
        text = one_line(err)
        assert text.startswith(f"the KV cache and activations of a block do not fit: {tier} needs "), text
        assert "--percent" in text
        assert {t: eng.held_bytes[t] for t in TIERS} == loaded
        assert len(eng.generate(SHORT, max_new_tokens=2)[0].token_ids) == 2  # a smaller block still runs


@pytest.mark.parametrize("tier,flag", [("gpu", "--gpu-mem"), ("cpu", "--cpu-mem"), ("disk", "--offload-dir")])
def test_a_tier_that_overflows_while_running_is_a_one_line_error(tiny_models, tmp_path, monkeypatch, tier, flag):
    """The tiers enforce their budgets as they allocate, whatever the up-front estimate said: here it says 0."""
    with Engine.load(tiny_models["opt"], policy=CACHE_ON[tier], offload_dir=tmp_path, **FITS_THE_MODEL[tier]) as eng:
        monkeypatch.setattr("engine.memory.block_bytes", lambda *args, **kwargs: dict.fromkeys(TIERS, 0))
        with pytest.raises(UserError) as err:
            eng.generate(LONG, max_new_tokens=20)
    text = one_line(err)
    assert text.startswith(f"{tier} tier over budget: needs ") and flag in text and "--percent" in text, text


# -- the disk itself -----------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["ftruncate", "pwritev", "short-write"])
def test_a_full_disk_at_load_says_so_and_leaves_nothing(tiny_models, tmp_path, monkeypatch, how):
    if how == "short-write":
        monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    else:
        monkeypatch.setattr(os, how, _enospc)
    with pytest.raises(UserError) as err:
        Engine.load(tiny_models["opt"], policy=ALL_DISK, offload_dir=tmp_path / "nvme")
    text = one_line(err)
    assert "the offload disk is full" in text and "--offload-dir" in text, text
    assert not (tmp_path / "nvme").exists()


def test_a_disk_that_fills_during_a_run_says_so(tiny_models, tmp_path, monkeypatch):
    with Engine.load(tiny_models["opt"], policy=CACHE_ON["disk"], offload_dir=tmp_path) as eng:
        monkeypatch.setattr(os, "pwritev", _enospc)  # the KV cache is written on an I/O worker
        with pytest.raises(UserError) as err:
            eng.generate(SHORT, max_new_tokens=2)
    text = one_line(err)
    assert "the offload disk is full" in text and "--offload-dir" in text, text


def _zero_estimate(monkeypatch) -> None:
    monkeypatch.setattr("engine.memory.block_bytes", lambda *args, **kwargs: dict.fromkeys(TIERS, 0))


def _full_disk(monkeypatch) -> None:
    monkeypatch.setattr(os, "pwritev", _enospc)


@pytest.mark.parametrize("tier,cause,prompts", [
    pytest.param("gpu", _zero_estimate, LONG, id="gpu-over-budget"),
    pytest.param("disk", _full_disk, SHORT, id="disk-full")])
def test_a_refused_run_gives_back_what_it_took_and_the_engine_runs_on(tiny_models, tmp_path, monkeypatch, tier,
                                                                      cause, prompts):
    with Engine.load(tiny_models["opt"], policy=CACHE_ON[tier], offload_dir=tmp_path, **FITS_THE_MODEL[tier]) as eng:
        loaded = {t: eng.held_bytes[t] for t in TIERS}
        expected = eng.generate(SHORT, max_new_tokens=2)[0].token_ids
        with monkeypatch.context() as patch:
            cause(patch)
            with pytest.raises(UserError):
                eng.generate(prompts, max_new_tokens=20)
        assert {t: eng.held_bytes[t] for t in TIERS} == loaded
        assert nothing_left(eng.offload_folder or tmp_path)
        assert eng.generate(SHORT, max_new_tokens=2)[0].token_ids == expected


# -- offload folders that cannot be written -----------------------------------------------------------------

@pytest.mark.parametrize("below", [False, True], ids=["is-a-file", "under-a-file"])
def test_an_offload_folder_blocked_by_a_file_is_refused_at_load(tiny_models, tmp_path, below):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    where = blocker / "offload" if below else blocker
    with pytest.raises(UserError) as err:
        Engine.load(tiny_models["opt"], policy=ALL_DISK, offload_dir=where)
    text = one_line(err)
    assert text.startswith(f"cannot create offload folder {where}: {blocker} is a file") and "--offload-dir" in text
    assert blocker.read_text() == "a file where the folder should be"


@pytest.mark.parametrize("sub", ["", "offload"], ids=["itself", "below"])
def test_a_read_only_offload_folder_is_refused_at_load(tiny_models, tmp_path, monkeypatch, sub):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # permissions do not bind root: answer as the kernel does for anyone else
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).is_relative_to(read_only):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    where = read_only / sub if sub else read_only
    try:
        with pytest.raises(UserError) as err:
            Engine.load(tiny_models["opt"], policy=ALL_DISK, offload_dir=where)
    finally:
        read_only.chmod(0o755)
    text = one_line(err)
    assert text.startswith(f"cannot create offload folder {where}") and "writable --offload-dir" in text, text
    assert nothing_left(read_only)
