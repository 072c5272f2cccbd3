"""HELM tokenizer backed by the engine model's own Hugging Face tokenizer folder.

HELM counts and truncates prompts with this tokenizer, so it must be the model's. Token strings
come from decoding each id on its own, which is right for byte-level BPE (OPT, SmolLM2) and for
SentencePiece models alike, unlike HELM's name-based cleanup of `Ġ`/`▁` markers.
"""

from __future__ import annotations

import threading
from typing import Any

from helm.common.cache import CacheConfig
from helm.tokenizers.caching_tokenizer import CachingTokenizer
from transformers import AutoTokenizer  # at import: transformers' lazy imports race under HELM's threads


class EngineTokenizer(CachingTokenizer):
    def __init__(self, cache_config: CacheConfig, tokenizer_name: str, pretrained_model_name_or_path: str):
        super().__init__(cache_config=cache_config)
        self._name = tokenizer_name
        self._folder = pretrained_model_name_or_path
        self._tokenizer = None
        self._lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads

    def _hf(self):
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self._folder, local_files_only=True)
        return self._tokenizer

    def _tokenize_do_it(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            tok = self._hf()
            if request["encode"] and request["truncation"]:
                ids = tok.encode(request["text"], add_special_tokens=False, truncation=True,
                                 max_length=max(request["max_length"], 0))
            else:
                ids = tok.encode(request["text"], add_special_tokens=False)
            if request["encode"]:
                return {"tokens": ids}
            return {"tokens": [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids]}

    def _decode_do_it(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            text = self._hf().decode(request["tokens"],
                                     clean_up_tokenization_spaces=request["clean_up_tokenization_spaces"])
        return {"text": text}
