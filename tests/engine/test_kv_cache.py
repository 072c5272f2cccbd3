"""Issue 16: the KV cache is written in place and attended where it is stored, on the CPU beside a host cache too.

A resident cache segment (the gpu tier; the cpu tier under `cpu_cache_compute`) is one buffer per K and V
allocated for the whole generation: each pass writes only its new positions, and attention reads the
prefix out of that buffer, with no concatenation, no conversion and no decoding of a plain cache. Results
must still equal attention over the same keys and values, and whole generations must still equal HF's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.reference import assert_matches_hf

from engine import Engine, Policy
from engine import kv_cache as kv_cache_module
from engine.bench.reference import POLICIES
from engine.channel_keys import KeyBlocks
from engine.kv_cache import LayerCache
from engine.models.layers import attention
from engine.quant import groupwise
from engine.quant.groupwise import QuantSpec

MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]
CPU_ATTENTION = Policy(cpu_cache_compute=True)
# the cache's heads over the tiers beside CPU attention: resident on the gpu and cpu tiers, streamed from disk
SPLITS = {"cpu": CPU_ATTENTION.with_percent(100, 0, 0, 100, 100, 0),
          "gpu-cpu": CPU_ATTENTION.with_percent(100, 0, 50, 50, 100, 0),
          "cpu-disk": CPU_ATTENTION.with_percent(100, 0, 0, 50, 100, 0),
          "three-tiers": CPU_ATTENTION.with_percent(100, 0, 25, 50, 100, 0),  # OPT's 4 KV heads 1 / 2 / 1
          "gpu": Policy().with_percent(100, 0, 100, 0, 100, 0)}
PASSES = [5, 1, 1, 1]  # a prefill of 5 positions, then three decode steps
BATCH, MAX_LEN, PADS = 3, 8, [0, 2, 0]  # row 1 is left-padded by two positions


def _inputs(rt, s: int, gen: torch.Generator):
    cfg = rt.cfg
    b, d = BATCH, cfg.head_dim
    q = torch.randn(b, s, cfg.n_heads, d, generator=gen)
    k, v = (torch.randn(b, s, cfg.kv_heads, d, generator=gen) for _ in range(2))
    return q, k, v


def _allowed(t0: int, s: int) -> torch.Tensor:
    keys = torch.arange(t0 + s)
    allowed = keys[None, None, :] <= (t0 + torch.arange(s))[None, :, None]
    valid = torch.stack([keys >= pad for pad in PADS])
    return allowed & valid[:, None, :]


def _stored(rt, x: torch.Tensor) -> torch.Tensor:
    """What the cache holds of x, as values: rounded to the storage dtype, or through the 4-bit codec."""
    if rt.cache_quant is None:
        return x.to(rt.storage_dtype).double()
    return groupwise.decode_rows(groupwise.encode_rows(x, rt.cache_quant), x.shape[-1], rt.cache_quant,
                                 torch.float32).double()


def _by_channel(rt) -> bool:
    return rt.cache_quant is not None and rt.policy.comp_cache_keys == "channel"


def _keys_seen(rt, keys: torch.Tensor, query: int) -> torch.Tensor:
    """The keys (b, t, h, d) a query at position `query` attends over. Channel-grouped: every whole block
    before the query's own, each channel's `group` values quantized as one group; the rest as stored."""
    if not _by_channel(rt):
        return _stored(rt, keys)
    group, raw = rt.cache_quant.group, keys.to(rt.storage_dtype)
    own = query // group * group
    blocks = [raw[:, j:j + group].permute(0, 2, 3, 1) for j in range(0, own, group)]  # (b, h, d, group)
    coded = [_stored(rt, block.float()).permute(0, 3, 1, 2) for block in blocks]
    return torch.cat([*coded, raw[:, own:].double()], dim=1)


def _reference(q, k, v, allowed, scale: float) -> torch.Tensor:
    """Softmax attention in fp64 over every key, query head i on KV head i // group, as HF does."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k) * scale
    scores = scores.masked_fill(~allowed[:, None], -torch.inf)
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)


def _run(rt, cache: LayerCache, spy: list):
    """PASSES through `cache`, each checked against the reference over everything cached so far; yields
    each pass's new positions, with what the cache handed to attention in `spy`."""
    gen, t0, keys, values = torch.Generator().manual_seed(0), 0, [], []
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[rt.storage_dtype]
    for s in PASSES:
        q, k, v = _inputs(rt, s, gen)
        keys.append(k)
        values.append(_stored(rt, v))
        allowed = _allowed(t0, s)
        spy.clear()
        out = cache.attend(cache.fetch(), allowed, q, k, v, q.shape[-1] ** -0.5)
        # one attention call a segment; channel-grouped keys one per block of this pass's queries
        calls = [(t0 + s - 1) // seg.keys.group - t0 // seg.keys.group + 1 if seg.keys else 1 for seg in cache.segments]
        assert len(spy) == sum(calls) and out.dtype == q.dtype
        expected = torch.cat([_reference(q[:, i:i + 1], _keys_seen(rt, torch.cat(keys, dim=1), t0 + i),
                                         torch.cat(values, dim=1), allowed[:, i:i + 1], q.shape[-1] ** -0.5)
                              for i in range(s)], dim=1)
        real = torch.tensor(PADS)[:, None] <= t0 + torch.arange(s)  # a left pad's own output is never used
        torch.testing.assert_close(out.double()[real], expected[real], atol=tol, rtol=tol)
        t0 += s
        yield s


def _bytes_per_generation(rt, seg) -> int:
    """What a segment's stores take over PASSES: each position once, as a token row or, for channel-grouped
    keys, in its block once the block is whole and in the window while it is not."""
    rows = sum(PASSES) * seg.codec.row_bytes
    if seg.keys is None:
        return 2 * rows
    group, t0, window = seg.keys.group, 0, 0
    for s in PASSES:
        window += sum(1 for p in range(t0, t0 + s) if p >= (t0 + s) // group * group)
        t0 += s
    return rows + t0 // group * seg.keys.block_bytes + window * seg.keys.token_bytes


def _written(rt) -> int:
    return sum(tier.bytes_written for tier in rt.tiers.values())


@pytest.fixture
def spy(monkeypatch) -> list:
    """Every (k, v) the cache hands to attention, as (b, t, heads, d) tensors."""
    seen: list = []

    def recording(q, k, v, allowed, scale):
        seen.append((k, v))
        return attention(q, k, v, allowed, scale)

    monkeypatch.setattr(kv_cache_module, "attention", recording)
    return seen


@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("split", ["cpu", "gpu-cpu", "gpu"])
@pytest.mark.parametrize("name", ["opt", "llama"])  # 4 KV heads; 2 KV heads shared by 4 query heads
def test_resident_cache_is_written_in_place_and_attended_as_views(tiny_models, tmp_path, spy, name, split, storage):
    policy = dataclasses.replace(SPLITS[split], storage_dtype=storage)
    with Engine.load(tiny_models[name], policy=policy, device="cpu", offload_dir=tmp_path) as eng:
        rt = eng._rt
        cache = LayerCache(rt, BATCH, MAX_LEN)
        buffers = [(seg.k.buf.data_ptr(), seg.v.buf.data_ptr()) for seg in cache.segments]
        assert all(seg.views is not None for seg in cache.segments) and not cache.streams
        t, before = 0, _written(rt)
        for s in _run(rt, cache, spy):
            t += s
            for seg, (k, v) in zip(cache.segments, spy, strict=True):
                for seen, store in ((k, seg.k), (v, seg.v)):
                    # a view of the store itself: no copy, concatenation or conversion of the prefix
                    assert seen.untyped_storage().data_ptr() == store.buf.untyped_storage().data_ptr()
                    assert seen.dtype == rt.storage_dtype and seen.shape[1] == t
            # the stores took this pass's positions, once, and nothing of the prefix again
            assert _written(rt) - before == sum(2 * s * seg.codec.row_bytes for seg in cache.segments)
            before = _written(rt)
        assert [(seg.k.buf.data_ptr(), seg.v.buf.data_ptr()) for seg in cache.segments] == buffers
        cache.close()


@pytest.mark.parametrize("compress", [None, "token", "channel"], ids=["plain", "4-bit", "4-bit-channel-keys"])
@pytest.mark.parametrize("split", ["cpu", "cpu-disk", "gpu"])
@pytest.mark.parametrize("name", ["opt", "llama"])
def test_cpu_attention_equals_attention_over_what_the_cache_holds(tiny_models, tmp_path, spy, name, split, compress):
    """Streamed (disk) and compressed segments decode what attention needs; every pass still attends over
    exactly the stored keys and values, and the stores are written each position once. Channel-grouped keys
    (groups of 4 positions here) are seen per query: blocks before its own quantized, its own as computed,
    which the 5-position prefill crosses."""
    policy = dataclasses.replace(SPLITS[split], compress_cache=compress is not None, comp_cache_group=4,
                                 comp_cache_keys=compress or "channel")
    with Engine.load(tiny_models[name], policy=policy, device="cpu", offload_dir=tmp_path) as eng:
        rt = eng._rt
        cache = LayerCache(rt, BATCH, MAX_LEN)
        tiers = {"cpu": {"cpu"}, "cpu-disk": {"cpu", "disk"}, "gpu": {"gpu"}}[split]
        assert {seg.tier for seg in cache.segments} == tiers
        assert all((seg.keys is not None) == (compress == "channel") for seg in cache.segments)
        before = _written(rt)
        for _ in _run(rt, cache, spy):
            pass
        cache.close()  # waits for the disk writes
        assert _written(rt) - before == sum(_bytes_per_generation(rt, seg) for seg in cache.segments)


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
@pytest.mark.parametrize("split", ["cpu", "gpu-cpu", "cpu-disk", "three-tiers"])
@pytest.mark.parametrize("name", ["opt", "opt350", "llama"])
def test_cpu_attention_generations_match_hf(tiny_models, hf_model, tmp_path, name, split, device):
    with Engine.load(tiny_models[name], policy=SPLITS[split], device=device, offload_dir=tmp_path) as eng:
        assert_matches_hf(eng, hf_model(tiny_models[name]), MIXED, max_new=5, echo=True)


@pytest.mark.parametrize("split", ["cpu", "cpu-disk", "three-tiers"])
@pytest.mark.parametrize("name", ["opt", "llama"])
def test_compressed_cache_under_cpu_attention_gives_the_gpu_tiers_outputs(tiny_models, tmp_path, name, split):
    """A 4-bit cache cannot match HF, but where it is stored and where it is attended must not change what
    comes out: attention always sees the same decoded values."""
    outs = []
    for policy in (POLICIES["all-gpu"], SPLITS[split]):
        with Engine.load(tiny_models[name], policy=dataclasses.replace(policy, compress_cache=True),
                         device="cpu", offload_dir=tmp_path) as eng:
            outs.append([(o.token_ids, o.logprobs) for o in eng.generate(MIXED, max_new_tokens=5)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("s", [1, 6])
def test_attention_without_a_mask_is_causal_attention(s):
    """`allowed=None` (no padded row) gives what an explicit causal mask gives, with or without KV groups."""
    gen = torch.Generator().manual_seed(0)
    for hq, hkv in ((4, 4), (4, 2)):
        q = torch.randn(2, s, hq, 8, generator=gen)
        k, v = (torch.randn(2, 6, hkv, 8, generator=gen) for _ in range(2))
        allowed = (torch.arange(6)[None, :] <= torch.arange(6 - s, 6)[:, None]).expand(2, s, 6)
        torch.testing.assert_close(attention(q, k, v, None, 0.3), attention(q, k, v, allowed, 0.3))
        expected = _reference(q, k.double(), v.double(), allowed, 0.3).float()
        torch.testing.assert_close(attention(q, k, v, None, 0.3), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_key_blocks_decode_into_any_slice_as_each_channel_decodes(dtype):
    """Blocks decode into a head-major slice of a larger keys buffer (what a GPU's fp16/bf16 attention gets
    too), each value what decode_rows gives its channel's group of positions, rounded once to the dtype."""
    rows, heads, dim, quant = 3, 2, 8, QuantSpec(4, 4)
    layout = KeyBlocks(rows, heads, dim, torch.float16, quant)
    keys = torch.randn(rows, 12, heads, dim, generator=torch.Generator().manual_seed(1)).half()
    blocks = layout.encode(keys)  # three blocks of four positions
    out = torch.full((rows, heads, 14, dim), float("nan"), dtype=dtype)
    layout.decode_into(blocks, out[:, :, 1:13])
    per_channel = keys.float().permute(0, 2, 3, 1).reshape(rows, heads, dim, 3, 4)  # groups along positions
    coded = groupwise.decode_rows(groupwise.encode_rows(per_channel, quant), 4, quant, torch.float32)
    expected = coded.reshape(rows, heads, dim, 12).transpose(2, 3).to(dtype)
    assert torch.equal(out[:, :, 1:13], expected)
    assert out[:, :, [0, 13]].isnan().all()  # nothing written outside the slice
