"""Compression: byte codecs, group-wise quantization, and the CPU int4 matmul kernel."""
