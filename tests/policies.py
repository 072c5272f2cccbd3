"""The placement-policy matrix every model must pass (shared by the tests and scripts/gpu_check.py)."""

from engine import Policy

POLICIES = {
    "all-gpu": Policy(),
    "weights-disk": Policy().with_percent(0, 0, 100, 0, 100, 0),
    # direct reads go to a worker, ahead of use; buffered ones (above) are read at use on a CPU
    "weights-disk-direct": Policy(direct_io=True).with_percent(0, 0, 100, 0, 100, 0),
    "weights-30-30-40": Policy().with_percent(30, 30, 100, 0, 100, 0),
    "cache-cpu-compute": Policy(cpu_cache_compute=True).with_percent(100, 0, 0, 100, 100, 0),
    "cache-half-disk": Policy().with_percent(100, 0, 50, 0, 100, 0),
    "act-cpu": Policy().with_percent(100, 0, 100, 0, 0, 100),
    "act-split": Policy().with_percent(100, 0, 100, 0, 30, 30),
    "three-gpu-batches": Policy(gpu_batch_size=1, num_gpu_batches=3).with_percent(50, 0, 30, 30, 30, 30),
    "no-overlap": Policy(overlap=False).with_percent(20, 30, 30, 30, 30, 30),
}
