"""Tiers of storage (gpu, cpu, disk) as byte stores, and how much host memory is left."""
