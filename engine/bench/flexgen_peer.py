"""FlexGen 0.1.8, the benchmark peer: loaded from its wheel at run time, driven offline, never copied.

The wheel (../shared/wheels) is unpacked once into the cache and put on sys.path only inside the
benchmark process that measures it. FlexGen hard-codes CUDA, so it runs on a GPU machine only. Its
own CLI downloads a tokenizer; offline, `OptLM` is built directly with dummy weights (a path holding
`_DUMMY_`), which fill every weight with ones: the outputs are meaningless, the timing is not.
"""

from __future__ import annotations

import dataclasses
import sys
import zipfile
from pathlib import Path
from types import ModuleType

from engine.errors import UserError
from engine.weights import cache_root

WHEEL_NAME = "flexgen-0.1.8-py3-none-any.whl"


def find_wheel() -> Path | None:
    """The wheel in the shared folder beside the repository (../shared/wheels), if it is there."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent.parent / "shared" / "wheels" / WHEEL_NAME
        if candidate.is_file():
            return candidate
    return None


def load_flexgen(wheel: Path | None = None) -> ModuleType:
    """Import `flexgen.flex_opt` from the unpacked wheel."""
    wheel = wheel or find_wheel()
    if wheel is None:
        raise UserError(f"FlexGen's wheel {WHEEL_NAME} was not found in ../shared/wheels; it is the peer measured")
    folder = cache_root() / "peers" / wheel.stem
    if not (folder / "flexgen" / "flex_opt.py").is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(folder)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import flexgen.flex_opt as flex_opt  # the peer: imported only in the process that measures it

    return flex_opt


@dataclasses.dataclass(frozen=True)
class PeerRun:
    prefill_s: float
    decode_s: float
    generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / (self.prefill_s + self.decode_s)


def run_opt(model: str, layers: int | None, percent: tuple[float, ...], gpu_batch_size: int, num_gpu_batches: int,
            cpu_cache_compute: bool, compress: bool, prompt_len: int, gen_len: int, offload_dir: Path) -> PeerRun:
    """FlexGen's OPT on dummy weights, timed as its own benchmark does (warm-up, then prefill + decode)."""
    fo = load_flexgen()
    from flexgen.compression import CompressionConfig
    from flexgen.pytorch_backend import TorchDevice, TorchDisk, TorchMixedDevice
    from flexgen.timer import timers
    from flexgen.utils import ExecutionEnv

    config = fo.get_opt_config(model)
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    gpu, cpu, disk = TorchDevice("cuda:0"), TorchDevice("cpu"), TorchDisk(str(offload_dir))
    env = ExecutionEnv(gpu=gpu, cpu=cpu, disk=disk, mixed=TorchMixedDevice([gpu, cpu, disk]))
    policy = fo.Policy(gpu_batch_size, num_gpu_batches, *percent, overlap=True, sep_layer=True, pin_weight=True,
                       cpu_cache_compute=cpu_cache_compute, attn_sparsity=1.0, compress_weight=compress,
                       comp_weight_config=CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False),
                       compress_cache=compress,
                       comp_cache_config=CompressionConfig(num_bits=4, group_size=64, group_dim=2, symmetric=False))
    rows = gpu_batch_size * num_gpu_batches
    try:
        lm = fo.OptLM(config, env, str(offload_dir / "_DUMMY_"), policy)
        lm.generate([[2] * 32] * rows, max_new_tokens=1)  # warm-up, as its own benchmark does
        timers("generate").reset()
        lm.generate([[2] * prompt_len] * rows, max_new_tokens=gen_len)
        costs = timers("generate").costs
    finally:
        env.close_copy_threads()
    return PeerRun(costs[0], sum(costs[1:]), rows * gen_len)
