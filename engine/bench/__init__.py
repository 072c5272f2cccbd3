"""Benchmarks and measurement commands: each compares the engine with a peer in the same run."""
