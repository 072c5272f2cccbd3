"""The public API: `Engine.load(...)` places a model over the tiers, `generate(...)` runs blocks of rows."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from engine import memory
from engine.config import ModelConfig
from engine.errors import UserError
from engine.generation import Generation, GenerationStats
from engine.models.registry import adapter_for
from engine.placement import place_layer_weights
from engine.policy import TIERS, Policy, parse_size, torch_dtype
from engine.quant import int4_kernel
from engine.quant.codec import WeightCodec
from engine.quant.groupwise import QuantSpec
from engine.runtime import LayerPlan, Runtime, StoredWeight, allocate_buffers
from engine.sampling import choose, find_stop, row_generator
from engine.schedule import Rows, run_block
from engine.storage.tiers import make_tiers
from engine.weights import load_tokenizer, resolve, stream_dummy, stream_folder


def compute_device(name: str | torch.device | None) -> torch.device:
    """The device as its tensors report it ("cuda:0", "cpu"), so that placement checks compare equal.

    `torch.device("cuda") != torch.device("cuda:0")`, yet every CUDA tensor reports an index and
    every CPU tensor none; a device kept as the user spelled it makes data already in place look
    elsewhere, and buffers sized from the two spellings disagree.
    """
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is available; leave --device unset")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)


class Engine:
    """A model placed over the gpu, cpu and disk tiers according to a `Policy`."""

    def __init__(self, rt: Runtime, tokenizer, source: str):
        self._rt, self.tokenizer, self.source = rt, tokenizer, source  # _rt: internals, for white-box tests only
        self.stats = GenerationStats()  # of the last generate() call

    def close(self) -> None:
        """Free the tiers and remove the offload files now (they also go at exit)."""
        self._rt.io.shutdown(wait=True)
        self._rt.tiers["disk"].close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def config(self) -> ModelConfig:
        return self._rt.cfg

    @property
    def policy(self) -> Policy:
        return self._rt.policy

    @property
    def device(self) -> torch.device:
        return self._rt.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._rt.compute_dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._rt.storage_dtype

    @property
    def held_bytes(self) -> dict[str, int]:
        """Bytes each tier holds now: stored weights and reserved buffers between calls."""
        return {t: self._rt.tiers[t].used for t in TIERS}

    @property
    def offload_folder(self) -> Path | None:
        """The disk tier's folder, once something was stored there; it goes with `close()`."""
        return self._rt.tiers["disk"].folder

    @property
    def stored_weight_bytes(self) -> int:
        """Bytes the weights take on their tiers, as stored (compressed or not), without working buffers."""
        return sum(sw.codec.nbytes for layer in self._rt.weights for sw in layer.values())

    @property
    def fused_weights(self) -> int:
        """How many weights run in torch's fused int4 kernel (engine.quant.int4_kernel)."""
        return sum(sw.codec.fused for layer in self._rt.weights for sw in layer.values())

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike, policy: Policy | None = None, weights: str | None = None,
             device: str | None = None, offload_dir: str | os.PathLike | None = None,
             gpu_mem: int | str | None = None, cpu_mem: int | str | None = None,
             disk_mem: int | str | None = None, tokenizer: str | None = None, seed: int = 0) -> Engine:
        """Place `model` (a named config or a HF checkpoint folder) and stream its weights in."""
        policy = policy or Policy()
        cfg, folder = resolve(model, weights)
        dev = compute_device(device)
        if policy.threads:
            torch.set_num_threads(policy.threads)
        compute, storage = _dtype(policy.compute_dtype, dev), _dtype(policy.storage_dtype or policy.compute_dtype, dev)
        tiers = make_tiers(dev, parse_size(gpu_mem), parse_size(cpu_mem), offload_dir, parse_size(disk_mem),
                           policy.direct_io, policy.pin_weight)
        try:
            rt = cls._place(cfg, policy, tiers, dev, compute, storage, folder, seed)
            tok = load_tokenizer(folder, cfg, tokenizer)
        except BaseException:
            tiers["disk"].close()
            raise
        return cls(rt, tok, str(folder) if folder else f"{cfg.name}:dummy")

    @staticmethod
    def _place(cfg, policy, tiers, dev, compute, storage, folder, seed) -> Runtime:
        adapter = adapter_for(cfg)
        specs = adapter.layer_specs(cfg)
        wquant = QuantSpec(policy.comp_weight_bits, policy.comp_weight_group) if policy.compress_weight else None
        placed = []
        for spec in specs:
            codecs = {n: WeightCodec(s, storage, wquant if len(s) == 2 else None, policy.comp_weight_dim,
                                     fused=policy.fused_int4 and n not in spec.tables
                                     and int4_kernel.supported(s, wquant, policy.comp_weight_dim, dev))
                      for n, s in spec.shapes.items()}
            where = place_layer_weights({n: c.nbytes for n, c in codecs.items()}, policy)
            placed.append({n: (where[n], codecs[n]) for n in codecs})
        need = memory.weight_bytes(placed)
        at_use = [memory.read_at_use(layer, spec, dev, policy)
                  for layer, spec in zip(placed, specs, strict=True)]
        work = memory.working_bytes(placed, specs, dev, compute, at_use, policy)
        total = {t: need[t] + work[t] for t in TIERS}
        memory.check(total, {t: tiers[t].capacity for t in TIERS}, f"{cfg.name or 'model'} does not fit", dev)
        stored = [{n: StoredWeight(t, tiers[t].store(c.nbytes, f"{spec.name}.{n}"), c) for n, (t, c) in layer.items()}
                  for spec, layer in zip(specs, placed, strict=True)]
        buffers = allocate_buffers(tiers, dev, work, memory.buffer_slots(dev, policy))
        # Workers take direct disk reads, and on a GPU any disk reads, uploads and decoding (schedule.LayerLoad).
        cuda = dev.type == "cuda"
        plans = []
        for layer, spec, names in zip(placed, specs, at_use, strict=True):
            tables = memory.tables_at_use(spec, names)
            background = ((memory.layer_staging_bytes(layer, tables) > 0 and (policy.direct_io or cuda))
                          or (cuda and memory.layer_working_bytes(layer, spec.tables, dev, compute, tables) > 0))
            plans.append(LayerPlan(names, background))
        rt = Runtime(cfg, adapter, specs, stored, plans, tiers, policy, dev, compute, storage,
                     ThreadPoolExecutor(max_workers=2, thread_name_prefix="flexhelm-io"),
                     QuantSpec(policy.comp_cache_bits, policy.comp_cache_group) if policy.compress_cache else None,
                     torch.cuda.Stream(dev) if cuda else None, buffers["gpu"], buffers["cpu"],
                     memory.table_scratch_bytes(placed, specs, at_use, dev, compute))

        def sink(pos: int, name: str, tensor: torch.Tensor) -> None:
            sw = stored[pos][name]
            sw.store.write(0, sw.codec.encode(tensor.to(dev) if wquant is not None else tensor))
            progress.update(1)

        total_tensors = sum(len(s.shapes) for s in specs)
        with tqdm(total=total_tensors, desc=f"loading {cfg.name or 'model'}", unit="tensor", leave=False,
                  disable=None) as progress:
            if folder is None:
                stream_dummy(specs, sink, seed)
            else:
                stream_folder(folder, specs, sink)
        for tier in tiers.values():
            tier.reset_counters()
        return rt

    # -- generation --------------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: list[str] | str | None = None, seed: int = 0,
                 logprobs: bool = True, echo_prompt: bool = False) -> list[Generation]:
        """Generate for every prompt; `outs[i]` answers `prompts[i]` however rows are regrouped."""
        rt, cfg, policy = self._rt, self._rt.cfg, self._rt.policy
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        ids = self._encode(prompts)
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if stops and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this checkpoint has none")
        for i, row in enumerate(ids):
            if not row:
                raise UserError(f"prompt {i} is empty")
            if len(row) + max_new_tokens > cfg.max_positions:
                raise UserError(f"prompt {i} has {len(row)} tokens; with {max_new_tokens} new tokens that exceeds "
                                f"the model's context of {cfg.max_positions}; shorten it or lower max_new_tokens")
        states = [_RowState(seed, i) for i in range(len(ids))]
        stats = GenerationStats(prompt_tokens=sum(len(r) for r in ids), block_size=policy.block_size)
        for tier in rt.tiers.values():
            tier.reset_counters()
        steps = max(1, max_new_tokens)
        blocks = plan_blocks([len(r) for r in ids], policy)
        stats.num_blocks = len(blocks)
        if max_new_tokens > 0 or echo_prompt:
            self._check_block_memory(blocks, [len(r) for r in ids], steps)
            with tqdm(total=len(ids) * steps, desc="generating", unit="tok", leave=False, disable=None) as progress:
                for block in blocks:
                    batches = [_rows(ids, batch, cfg) for batch in block]
                    stats.padded_prompt_tokens += sum(r.ids.numel() for r in batches)
                    rows, start = sum(len(b) for b in block), progress.n

                    def on_pass(step: int, seconds: float, rows: int = rows) -> None:
                        if step == 0:
                            stats.prefill_s += seconds
                        else:
                            stats.decode_s += seconds
                        progress.update(rows)

                    run_block(rt, batches, steps, echo_prompt,
                              self._on_step(batches, states, max_new_tokens, temperature, top_p, top_k, stops),
                              on_pass)
                    progress.update(start + rows * steps - progress.n)  # rows that all stopped early
        outs = [s.result(self.tokenizer, ids[i] if echo_prompt else None, stops, cfg)
                for i, s in enumerate(states)]
        stats.generated_tokens = sum(len(o.token_ids) for o in outs)
        for tier in TIERS:
            stats.peak_bytes[tier] = rt.tiers[tier].peak
            stats.bytes_read[tier] = rt.tiers[tier].bytes_read
            stats.bytes_written[tier] = rt.tiers[tier].bytes_written
        self.stats = stats
        if not logprobs:
            outs = [dataclasses.replace(o, logprobs=[]) for o in outs]
        return outs

    def _encode(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, list | tuple):
            raise UserError("prompts must be a list of strings or a list of token-id lists")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise UserError("text prompts need a tokenizer and this checkpoint has none; pass token ids")
            return [self.tokenizer(p).input_ids for p in prompts]
        out = []
        for p in prompts:
            if isinstance(p, str) or not all(isinstance(t, int) for t in p):
                raise UserError("prompts must all be strings or all be lists of token ids")
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")
            out.append(list(p))
        return out

    def _check_block_memory(self, blocks: list[list[list[int]]], lengths: list[int], steps: int) -> None:
        rt = self._rt
        elem = torch.empty((), dtype=rt.compute_dtype).element_size()
        worst = memory.zero()
        for block in blocks:
            shapes = [(len(b), max(lengths[i] for i in b)) for b in block]
            need = memory.block_bytes(rt.cfg, rt.policy, shapes, steps, rt.storage_dtype, elem, rt.cache_quant,
                                      rt.table_scratch)
            worst = {t: max(worst[t], need[t]) for t in TIERS}
        free = {t: rt.tiers[t].capacity - rt.tiers[t].used for t in TIERS}
        memory.check(worst, free, "the KV cache and activations of a block do not fit", rt.device)

    def _on_step(self, batches, states, max_new, temperature, top_p, top_k, stops):
        tok, eos = self.tokenizer, set(self.config.eos_token_id)
        filler = self.config.pad_token_id or 0

        def on_step(k: int, step: int, last: torch.Tensor, prompt_lp: torch.Tensor | None):
            rows = [states[i] for i in batches[k].index]
            if prompt_lp is not None:
                lp = prompt_lp.cpu().tolist()
                for r, state, n in zip(range(len(rows)), rows, batches[k].mask.sum(-1).tolist(), strict=True):
                    state.prompt_logprobs = lp[r][len(lp[r]) - (n - 1):] if n > 1 else []
            if max_new == 0:
                return torch.full((len(rows),), filler), True
            nxt = choose(last, temperature, top_p, top_k, [s.generator for s in rows])
            chosen = last.gather(-1, nxt.to(last.device)[:, None])[:, 0].cpu().tolist()
            for state, token, lp in zip(rows, nxt.tolist(), chosen, strict=True):
                if not state.done:
                    state.add(token, lp, eos, stops, tok, max_new)
            return nxt.masked_fill(torch.tensor([s.done for s in rows]), filler), all(s.done for s in rows)

        return on_step


class _RowState:
    def __init__(self, seed: int, row: int):
        self.generator = row_generator(seed, row)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] | None = None
        self.done, self.reason, self.stop_at = False, "length", None

    def add(self, token: int, lp: float, eos: set[int], stops: list[str], tok, max_new: int) -> None:
        self.tokens.append(token)
        self.logprobs.append(lp)
        if token in eos:
            self.done, self.reason = True, "eos"
        elif stops and (at := find_stop(tok.decode(self.tokens), stops)) is not None:
            self.done, self.reason, self.stop_at = True, "stop", at
        elif len(self.tokens) >= max_new:
            self.done = True

    def result(self, tok, prompt: list[int] | None, stops, cfg: ModelConfig) -> Generation:
        body = self.tokens[:-1] if self.reason == "eos" else self.tokens
        text = tok.decode(body) if tok is not None else ""
        if self.stop_at is not None:
            text = text[:self.stop_at]
        prompt_lp = None if prompt is None else [None] + list(self.prompt_logprobs or [])
        return Generation(text, list(self.tokens), list(self.logprobs), self.reason, prompt_lp)


def plan_blocks(lengths: list[int], policy: Policy) -> list[list[list[int]]]:
    """Group rows of similar length: blocks of gpu_batch_size x num_gpu_batches, sorted by length."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    gbs, block = policy.gpu_batch_size, policy.block_size
    return [[order[b:b + block][g:g + gbs] for g in range(0, len(order[b:b + block]), gbs)]
            for b in range(0, len(order), block)]


def _rows(ids: list[list[int]], index: list[int], cfg: ModelConfig) -> Rows:
    width = max(len(ids[i]) for i in index)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens = torch.full((len(index), width), pad, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.bool)
    for r, i in enumerate(index):
        tokens[r, width - len(ids[i]):] = torch.tensor(ids[i])
        mask[r, width - len(ids[i]):] = True
    return Rows(list(index), tokens, mask)
