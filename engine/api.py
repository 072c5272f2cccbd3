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
from engine.policy import TIERS, Policy, parse_size
from engine.runtime import LayerPlan, Runtime, StoredWeight, allocate_buffers
from engine.sampling import choose, find_stop, row_generator
from engine.schedule import Rows, run_block
from engine.storage.host_memory import available_ram
from engine.storage.tiers import make_tiers
from engine.weights import load_tokenizer, resolve, stream_encoded


def _spelled_device(name: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    return dev


def compute_device(name: str | torch.device | None) -> torch.device:
    """The device as its tensors report it ("cuda:0", "cpu"), so that placement checks compare equal.

    `torch.device("cuda") != torch.device("cuda:0")`, yet every CUDA tensor reports an index and
    every CPU tensor none; a device kept as the user spelled it makes data already in place look
    elsewhere, and buffers sized from the two spellings disagree.
    """
    dev = _spelled_device(name)
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is available; leave --device unset")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def plan_device(name: str | torch.device | None) -> torch.device:
    """The device a plan is for, spelled as compute_device spells it, also where this machine has no GPU:
    a GPU run is sized before the GPU is at hand."""
    dev = _spelled_device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cuda", dev.index or 0)
    return compute_device(dev)


def _gpu_budget(device: torch.device, gpu_mem: int | None) -> int:
    """The gpu tier's budget as make_tiers sets it: the device's free memory (host RAM without a GPU)."""
    if gpu_mem is not None:
        return gpu_mem
    if device.type != "cuda":
        return available_ram()
    if not torch.cuda.is_available():
        raise UserError(f"planning for {device} on a machine without a GPU needs its budget: pass gpu_mem "
                        "(--gpu-mem)")
    return torch.cuda.mem_get_info(device)[0]


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
    def plan(cls, model: str | os.PathLike, policy: Policy | None = None, weights: str | None = None,
             device: str | None = None, gpu_mem: int | str | None = None, cpu_mem: int | str | None = None,
             disk_mem: int | str | None = None, offload_dir: str | os.PathLike | None = None, *, prompt_len: int,
             gen_len: int, num_prompts: int | None = None, echo_prompt: bool = False) -> memory.MemoryPlan:
        """Peak bytes per tier of loading `model` and generating `gen_len` tokens for `num_prompts` prompts of
        `prompt_len` tokens (default: one full block), against the budgets. Allocates nothing, creates no folder.

        The arguments mean what they mean to `load`, which books exactly the plan's weights and buffers.
        `device` may be a GPU this machine lacks ("cuda"): the plan then needs `gpu_mem`.
        """
        policy = policy or Policy()
        cfg, _ = resolve(model, weights)
        rows = policy.block_size if num_prompts is None else num_prompts
        if prompt_len < 1 or gen_len < 0 or rows < 1:
            raise UserError("a plan needs prompt_len >= 1, gen_len >= 0 and num_prompts >= 1")
        if prompt_len + gen_len > cfg.max_positions:
            raise UserError(f"prompt_len {prompt_len} + gen_len {gen_len} exceeds the model's context of "
                            f"{cfg.max_positions}")
        dev = plan_device(device)
        budgets = {"gpu": _gpu_budget(dev, parse_size(gpu_mem)),
                   "cpu": parse_size(cpu_mem) if cpu_mem is not None else available_ram(),
                   "disk": parse_size(disk_mem) if disk_mem is not None else memory.free_disk(offload_dir)}
        return memory.plan(cfg, policy, dev, budgets, None if dev.type == "cuda" else available_ram(),
                           prompt_len=prompt_len, gen_len=gen_len, rows=rows, echo=echo_prompt)

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
        if policy.return_freed_memory:
            memory.return_freed_memory()
        compute, storage = memory.dtypes(policy, dev)
        lay = memory.layout(cfg, policy, dev, compute, storage)
        tiers = make_tiers(dev, parse_size(gpu_mem), parse_size(cpu_mem), offload_dir, parse_size(disk_mem),
                           policy.direct_io, policy.pin_weight)
        try:
            loaded = {t: lay.weights[t] + lay.buffers[t] for t in TIERS}
            memory.check(loaded, {t: tiers[t].capacity for t in TIERS}, f"{cfg.name or 'model'} does not fit", dev,
                         loaded["gpu"] + loaded["cpu"] + lay.loading)
            rt = cls._place(cfg, policy, lay, tiers, dev, compute, storage, folder, seed)
            tok = load_tokenizer(folder, cfg, tokenizer)
        except BaseException:
            tiers["disk"].close()
            raise
        return cls(rt, tok, str(folder) if folder else f"{cfg.name}:dummy")

    @staticmethod
    def _place(cfg, policy, lay: memory.Layout, tiers, dev, compute, storage, folder, seed) -> Runtime:
        """Store every weight where the layout says, allocate its buffers, and stream the weights in."""
        specs = lay.specs
        where = [(pos, n, t, c) for pos, layer in enumerate(lay.placed) for n, (t, c) in layer.items()]
        stores = {}  # each tier's weights made at once: on the host, one arena per tier (Tier.stores)
        for t in TIERS:
            mine = [(pos, n, c) for pos, n, tier, c in where if tier == t]
            made = tiers[t].stores([c.nbytes for _, _, c in mine], [f"{specs[pos].name}.{n}" for pos, n, _ in mine])
            stores.update({(pos, n): store for (pos, n, _), store in zip(mine, made, strict=True)})
        stored = [{n: StoredWeight(t, stores[pos, n], c) for n, (t, c) in layer.items()}
                  for pos, layer in enumerate(lay.placed)]
        buffers = allocate_buffers(tiers, dev, lay.buffers, lay.slots)
        # Workers take direct disk reads, and on a GPU any disk reads, uploads and decoding (schedule.LayerLoad).
        cuda = dev.type == "cuda"
        plans = []
        for layer, spec, names in zip(lay.placed, specs, lay.at_use, strict=True):
            tables = memory.tables_at_use(spec, names)
            background = ((memory.layer_staging_bytes(layer, tables) > 0 and (policy.direct_io or cuda))
                          or (cuda and memory.layer_working_bytes(layer, spec.tables, dev, compute, tables) > 0))
            plans.append(LayerPlan(names, background))
        rt = Runtime(cfg, adapter_for(cfg), specs, stored, plans, tiers, policy, dev, compute, storage,
                     ThreadPoolExecutor(max_workers=2, thread_name_prefix="flexhelm-io"), memory.cache_quant(policy),
                     torch.cuda.Stream(dev) if cuda else None, buffers["gpu"], buffers["cpu"], lay.table_scratch)

        def sink(pos: int, name: str, data: torch.Tensor) -> None:
            sw = stored[pos][name]
            if rt.input_major(pos, name):  # held (in, out), as InputMajor multiplies it: transposed straight into
                values = sw.store.buf.view(sw.codec.storage)  # its store, with no temporary the plan does not count
                values.view(sw.codec.shape[::-1]).copy_(data.view(sw.codec.storage).view(sw.codec.shape).t())
            else:
                sw.store.write(0, data)
            progress.update(1)

        total_tensors = sum(len(s.shapes) for s in specs)
        with tqdm(total=total_tensors, desc=f"loading {cfg.name or 'model'}", unit="tensor", leave=False,
                  disable=None) as progress:
            codecs = [{n: sw.codec for n, sw in layer.items()} for layer in stored]
            stream_encoded(folder, specs, codecs, seed, dev, sink)  # compressed weights: cached on disk
        for tier in tiers.values():
            tier.reset_counters()
        return rt

    # -- generation --------------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: list[str] | str | None = None, seed: int = 0,
                 logprobs: bool = True, echo_prompt: bool = False, prompt_top1: bool = False) -> list[Generation]:
        """Generate for every prompt; `outs[i]` answers `prompts[i]` however rows are regrouped.

        `echo_prompt` also returns each prompt token's log-prob; `prompt_top1` (which implies it) also the most
        likely token at each prompt position, which tells whether the prompt's tail is the greedy continuation.
        """
        rt, cfg, policy = self._rt, self._rt.cfg, self._rt.policy
        echo_prompt = echo_prompt or prompt_top1
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
        states = [_RowState(seed, i, rt.device) for i in range(len(ids))]
        stats = GenerationStats(prompt_tokens=sum(len(r) for r in ids), block_size=policy.block_size)
        for tier in rt.tiers.values():
            tier.reset_counters()
        steps = max(1, max_new_tokens)
        blocks = plan_blocks([len(r) for r in ids], policy)
        stats.num_blocks = len(blocks)
        if max_new_tokens > 0 or echo_prompt:
            self._check_block_memory(blocks, [len(r) for r in ids], steps, echo=echo_prompt)
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
                              on_pass, top1=prompt_top1)
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

    def _check_block_memory(self, blocks: list[list[list[int]]], lengths: list[int], steps: int,
                            echo: bool = False) -> None:
        """Refuse, before it runs, a call whose largest block does not fit beside the loaded model: its KV cache,
        activations and transients as Engine.plan counts them."""
        rt = self._rt
        worst = memory.zero()
        for block in blocks:
            shapes = [(len(b), max(lengths[i] for i in b)) for b in block]
            need = memory.block_bytes(rt.cfg, rt.policy, shapes, steps, rt.storage_dtype,
                                      rt.compute_dtype.itemsize, rt.cache_quant, rt.table_scratch,
                                      rt.device, len(lengths), echo)
            worst = {t: max(worst[t], need[t]) for t in TIERS}
        free = {t: rt.tiers[t].capacity - rt.tiers[t].used for t in TIERS}
        memory.check(worst, free, "the KV cache and activations of a block do not fit", rt.device)

    def _on_step(self, batches, states, max_new, temperature, top_p, top_k, stops):
        """The step callback of `run_block`: tokens are chosen on the device and read back once per step.

        A finished row is fed the token it chose, like the others: its outputs are dropped and rows never
        mix, so nothing of the host's bookkeeping has to go back to the device.
        """
        tok, eos = self.tokenizer, set(self.config.eos_token_id)
        filler = self.config.pad_token_id or 0

        def on_step(k: int, step: int, last: torch.Tensor, prompt_lp: torch.Tensor | None):
            rows = [states[i] for i in batches[k].index]
            if prompt_lp is not None:
                lp, top = prompt_lp.cpu().tolist() if prompt_lp.dim() == 3 else (prompt_lp.cpu().tolist(), None)
                for r, state, n in zip(range(len(rows)), rows, batches[k].mask.sum(-1).tolist(), strict=True):
                    state.prompt_logprobs = lp[r][len(lp[r]) - (n - 1):] if n > 1 else []
                    if top is not None:
                        state.prompt_top1 = [int(t) for t in top[r][len(top[r]) - (n - 1):]] if n > 1 else []
            if max_new == 0:
                return torch.full((len(rows),), filler, device=last.device), True
            nxt = choose(last, temperature, top_p, top_k, [s.generator for s in rows])
            # one read-back: token ids and their log-probs together (float64 holds every id exactly)
            tokens, chosen = torch.stack((nxt.double(), last.gather(-1, nxt[:, None])[:, 0].double())).tolist()
            for state, token, lp in zip(rows, tokens, chosen, strict=True):
                if not state.done:
                    state.add(int(token), lp, eos, stops, tok, max_new)
            return nxt, all(s.done for s in rows)

        return on_step


class _RowState:
    def __init__(self, seed: int, row: int, device: torch.device):
        self.generator = row_generator(seed, row, device)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] | None = None
        self.prompt_top1: list[int] | None = None
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
        top1 = None if prompt is None or self.prompt_top1 is None else [None, *self.prompt_top1]
        return Generation(text, list(self.tokens), list(self.logprobs), self.reason, prompt_lp, top1)


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
