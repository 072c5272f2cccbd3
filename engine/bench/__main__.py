"""`python -m engine.bench`: the offloading benchmark (engine.bench.offload)."""

from engine.bench.offload import main

main()
