"""The engine as an lm-evaluation-harness backend: `--model flexhelm --model_args pretrained=NAME|FOLDER,...`.

Tokenization, truncation, rolling windows and stop handling follow lm-eval's own `hf` backend step for
step (the same TemplateLM encoding, the same helpers), so the two score the same tokens and differ only
by the engine's arithmetic. Scores come from one prompt pass with echoed log-probs: the engine places
the scored sequence's last token too, so `max_length` is one less than the model's context.

Requests go to the engine in the HELM executor's blocks (harness.batching.plan_engine_calls: same
generation parameters, longest first, `gpu_batch_size x num_gpu_batches` rows). Every finished block is
written to lm-eval's `--use_cache` database at once, so a killed run resumes where it stopped.

Testing hook: with FLEXHELM_TEST_KILL_AFTER_CALLS=N the process SIGKILLs itself right after its N-th
engine call is committed to that cache, as the HELM executor does for `harness.run --resume`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from engine.flags import load_engine
from harness.batching import plan_engine_calls
from harness.helm.executor import KILL_AFTER_CALLS_ENV  # the HELM executor's test hook, same meaning
from harness.lm_eval_args import AUTO_GEN_LEN, AUTO_PROMPT_LEN, LM_EVAL_KEYS, parse_options

log = logging.getLogger("lm_eval.flexhelm")  # under lm-eval's logger, so its CLI shows it

# ((context, continuation) or None, context tokens, continuation tokens): TemplateLM's scoring request
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass
class CallCounts:
    """Engine work since load: lets a resumed run show that it recomputed nothing."""

    engine_calls: int = 0
    rows: int = 0
    scored_tokens: int = 0  # positions of the scored sequences, prompt tokens of generations included
    generated_tokens: int = 0
    engine_s: float = 0.0


@register_model("flexhelm")
class FlexhelmLM(TemplateLM):
    """lm-eval's LM interface over one loaded Engine."""

    def __init__(self, pretrained: str = "smollm2-135m", weights: str | None = None, seed: int = 0,
                 max_length: int | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, **options) -> None:
        super().__init__()
        del batch_size, max_batch_size  # rows per engine call are the policy's block: gpu_batch_size x num_gpu_batches
        args = parse_options({k: v for k, v in options.items() if k not in LM_EVAL_KEYS})
        # lm-eval's CLI passes device=cuda:0 by default; like its hf backend, fall back to the CPU without a GPU
        usable = device is not None and (str(device).startswith("cpu") or torch.cuda.is_available())
        args.model, args.weights, args.device = str(pretrained), weights, device if usable else None
        self.engine = load_engine(args, prompt_len=AUTO_PROMPT_LEN, gen_len=AUTO_GEN_LEN)
        self.tokenizer = self.engine.tokenizer
        self.seed = seed
        self._max_length = max_length or self.engine.config.max_positions - 1
        self.counts = CallCounts()
        self._kill_after = int(os.environ.get(KILL_AFTER_CALLS_ENV, 0))

    # -- what TemplateLM and lm-eval ask of a backend --------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256  # the hf backend's default

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        def done(i: int, answer: tuple[float, bool]) -> None:
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)

        return self._score([(ctx, cont) for _, ctx, cont in requests], done, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over the hf backend's disjoint windows of at most `max_length` tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals, left = [0.0] * len(requests), [owner.count(i) for i in range(len(requests))]

        def done(w: int, answer: tuple[float, bool]) -> None:
            i = owner[w]
            totals[i] += answer[0]
            left[i] -= 1
            if not left[i]:
                self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, totals[i])

        self._score(windows, done, disable_tqdm)
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]], done: Callable[[int, tuple[float, bool]], None],
               disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each continuation after its context, as the hf backend computes them
        (the context left-truncated to fit `max_length` scored positions)."""
        seqs = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)

        def call(rows: list[int]) -> None:
            gens = self.engine.generate([seqs[i] for i in rows], max_new_tokens=0, seed=self.seed,
                                        prompt_top1=True)
            for i, gen in zip(rows, gens, strict=True):
                cont, n = pairs[i][1], len(pairs[i][1])
                answer = (float(sum(gen.prompt_logprobs[-n:])), gen.prompt_top1[-n:] == cont)
                out[i] = answer
                done(i, answer)
            self.counts.scored_tokens += sum(len(seqs[i]) for i in rows)

        self._run(["score"] * len(seqs), [len(s) for s in seqs], call, "loglikelihood", disable_tqdm)
        return out

    # -- generation --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        args = [req.args for req in requests]
        settings, prompts = [], []
        for context, gen_kwargs in args:
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = tuple(handle_stop_sequences(kw.pop("until", None), eos=eos))
            max_new = int(kw.pop("max_gen_toks"))
            settings.append((until, max_new, float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                             float(kw.get("top_p", 1.0)), int(kw.get("top_k", 0) or 0)))
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new):])
        out = [""] * len(requests)

        def call(rows: list[int]) -> None:
            until, max_new, temperature, top_p, top_k = settings[rows[0]]
            gens = self.engine.generate([prompts[i] for i in rows], max_new_tokens=max_new, temperature=temperature,
                                        top_p=top_p, top_k=top_k, stop=list(until), seed=self.seed)
            for i, gen in zip(rows, gens, strict=True):
                out[i] = postprocess_generated_text(self.tok_decode(gen.token_ids), list(until), None)
                self.cache_hook.add_partial("generate_until", args[i], out[i])
                self.counts.generated_tokens += len(gen.token_ids)
            self.counts.scored_tokens += sum(len(prompts[i]) for i in rows)

        self._run(settings, [len(p) for p in prompts], call, "generate_until", disable_tqdm)
        return out

    # -- blocks ------------------------------------------------------------------------------------
    def _run(self, keys: list, lengths: list[int], call: Callable[[list[int]], None], what: str,
             disable_tqdm: bool) -> None:
        """Run `call` on the HELM executor's blocks, committing each block's answers to the cache before the next."""
        calls = plan_engine_calls(keys, lengths, self.engine.policy.block_size)
        with tqdm(total=len(keys), desc=f"flexhelm {what}", unit="req", disable=disable_tqdm or None) as bar:
            for rows in calls:
                start = time.perf_counter()
                call(rows)
                self.counts.engine_s += time.perf_counter() - start
                self.counts.engine_calls += 1
                self.counts.rows += len(rows)
                if self.cache_hook.dbdict is not None:
                    self.cache_hook.dbdict.commit()
                if self.counts.engine_calls == self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                bar.update(len(rows))
        log.info("flexhelm %s: %d requests in %d engine calls", what, len(keys), len(calls))
