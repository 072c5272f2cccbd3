"""How an engine model becomes a HELM model: its identity, and the local config files HELM reads.

HELM finds models through `model_metadata.yaml`, `model_deployments.yaml` and
`tokenizer_configs.yaml` in a `--local-path` folder. We write those files for any engine model,
named or given by checkpoint folder. The deployment's client args carry the whole `EngineSpec`, so
stock `helm-run`, our client and our executor all rebuild the same engine from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.policy import PERCENT_FIELDS, Policy
from harness.files import write_text_atomic

ORG = "flexhelm"
CLIENT_CLASS = "harness.helm.client.EngineClient"
TOKENIZER_CLASS = "harness.helm.tokenizer.EngineTokenizer"
# Policy fields that change no output beyond fp32 rounding: where tensors live and how their I/O runs
# (placements give the same tokens and log-probs within 2e-6, tests/harness/test_harness_units.py: on a
# CPU a resident weight's product is summed in another order than an offloaded one's). Batching is left
# out too, for the same reason: a row's last bits depend on which rows share its block (their padding),
# which no key can name, so a key on the block size would make cache hits rarer without making them exact.
OUTPUT_NEUTRAL = (*PERCENT_FIELDS, "overlap", "pin_weight", "direct_io", "gpu_batch_size", "num_gpu_batches",
                  "return_freed_memory")  # the C allocator's threshold: where freed memory goes, not values
# How a compression variant names itself in HELM, as data: per switch, (prefix, field) pairs; the bits are
# always named, the other fields only where they differ from the default. Defaults give the compression
# label the output folders and reports use (w4c4, ...).
VARIANT_FIELDS = (("compress_weight", (("w", "comp_weight_bits"), ("g", "comp_weight_group"),
                                       ("dim", "comp_weight_dim"), ("", "comp_weight_fit"))),
                  ("compress_cache", (("c", "comp_cache_bits"), ("g", "comp_cache_group"), ("", "comp_cache_keys"))))


def variant_name(policy: Policy) -> str:
    """The compression variant of `policy` for model names: '' when uncompressed, else e.g. `w4c4`."""
    default = Policy()
    return "".join(f"{prefix}{getattr(policy, name)}"
                   for switch, fields in VARIANT_FIELDS if getattr(policy, switch)
                   for i, (prefix, name) in enumerate(fields)
                   if i == 0 or getattr(policy, name) != getattr(default, name))


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build the engine a deployment runs on."""

    model: str  # a named config ("opt-30b", "smollm2-135m") or an absolute checkpoint folder
    weights: str | None = None  # "dummy" for seeded random weights
    policy: dict = field(default_factory=dict)  # Policy.to_dict()
    seed: int = 0
    load: dict = field(default_factory=dict)  # Engine.load options that change no output: gpu_mem, ...

    @staticmethod
    def create(model: str, weights: str | None, policy: Policy, seed: int = 0, **load) -> EngineSpec:
        if os.path.isdir(model):
            model = str(Path(model).resolve())
        return EngineSpec(model=model, weights=weights, policy=policy.to_dict(), seed=seed,
                          load={k: v for k, v in load.items() if v is not None})

    @property
    def policy_obj(self) -> Policy:
        return Policy(**self.policy)

    @property
    def slug(self) -> str:
        """Short model name for HELM names and folder names."""
        name = Path(self.model).name if os.path.isabs(self.model) else self.model
        name = "".join(c if c.isalnum() or c in "-._" else "-" for c in name.lower())
        return f"{name}-dummy" if self.weights == "dummy" else name

    @property
    def deployment(self) -> str:
        """HELM's model and deployment name. It carries the compression variant, so uncompressed and
        compressed runs of one suite are distinct models (and run names) when HELM summarizes them together."""
        variant = variant_name(self.policy_obj)
        return f"{ORG}/{self.slug}-{variant}" if variant else f"{ORG}/{self.slug}"

    def to_args(self) -> dict:
        return dataclasses.asdict(self)

    def output_identity(self, device_type: str, compute_dtype: str, storage_dtype: str) -> dict:
        """What can change a generated output, for request-cache keys: the model and its files, the seed,
        the device type with the dtypes the engine resolved on it (fp32 on a CPU, fp16 on a GPU when the
        policy names none), and every policy field except OUTPUT_NEUTRAL ones."""
        numerics = {k: v for k, v in self.policy_obj.to_dict().items() if k not in OUTPUT_NEUTRAL}
        numerics.update(compute_dtype=compute_dtype, storage_dtype=storage_dtype)
        return {"model": self.model, "model_files": checkpoint_fingerprint(self.model), "weights": self.weights,
                "seed": self.seed, "device": device_type, "policy": numerics}


def checkpoint_fingerprint(model: str) -> str | None:
    """Hash of a checkpoint folder's config.json, so a replaced checkpoint never hits old cache entries."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFacts:
    """What HELM must know about the model that the spec alone does not say."""

    tokenizer_dir: str
    max_sequence_length: int
    num_parameters: int | None = None
    end_of_text_token: str | None = None
    prefix_token: str | None = None


def write_local_config(folder: str | os.PathLike, spec: EngineSpec, facts: ModelFacts) -> Path:
    """Write HELM's three registration files for `spec` into `folder`; return the folder."""
    folder = Path(folder)
    name = spec.deployment
    metadata = {"models": [{
        "name": name,
        "display_name": f"{spec.slug} (flexhelm {spec.policy_obj.compression_label()})",
        "description": f"{spec.model} on the flexhelm offloading engine",
        "creator_organization_name": ORG,
        "access": "open",
        "release_date": None,
        "num_parameters": facts.num_parameters,
        "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"],
    }]}
    tokenizer = {"name": name,
                 "tokenizer_spec": {"class_name": TOKENIZER_CLASS,
                                    "args": {"pretrained_model_name_or_path": facts.tokenizer_dir}}}
    if facts.end_of_text_token is not None:
        tokenizer["end_of_text_token"] = facts.end_of_text_token
    if facts.prefix_token is not None:
        tokenizer["prefix_token"] = facts.prefix_token
    deployments = {"model_deployments": [{
        "name": name,
        "model_name": name,
        "tokenizer_name": name,
        "max_sequence_length": facts.max_sequence_length,
        "client_spec": {"class_name": CLIENT_CLASS, "args": spec.to_args()},
    }]}
    for filename, content in [("model_metadata.yaml", metadata),
                              ("tokenizer_configs.yaml", {"tokenizer_configs": [tokenizer]}),
                              ("model_deployments.yaml", deployments)]:
        write_text_atomic(folder / filename, yaml.safe_dump(content, sort_keys=False))
    return folder


def spec_of_deployment(deployment_name: str) -> EngineSpec:
    """The EngineSpec registered for a HELM deployment (written by `write_local_config`)."""
    from helm.benchmark.model_deployment_registry import get_model_deployment

    args = get_model_deployment(deployment_name).client_spec.args
    return EngineSpec(**{f.name: args[f.name] for f in dataclasses.fields(EngineSpec) if f.name in args})


_builtins_registered: list[bool] = []  # once per process: HELM's registries only ever grow


def register_helm_configs(config_dir: str | os.PathLike) -> None:
    """Register HELM's built-in models plus ours. HELM parses its ~20k lines of model YAML with the
    pure-Python loader (seconds); we lend it libyaml's equivalent safe loader for the duration."""
    from helm.benchmark.config_registry import (
        register_builtin_configs_from_helm_package,
        register_configs_from_directory,
    )

    pure_python = yaml.safe_load
    if getattr(yaml, "__with_libyaml__", False):
        yaml.safe_load = lambda stream: yaml.load(stream, Loader=yaml.CSafeLoader)
    try:
        if not _builtins_registered:
            register_builtin_configs_from_helm_package()
            _builtins_registered.append(True)
        register_configs_from_directory(str(config_dir))
    finally:
        yaml.safe_load = pure_python
