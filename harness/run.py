"""`python -m harness.run`: run a HELM suite on the offloading engine, in-process, in large batches.

    python -m harness.run --suite smoke --model smollm2-135m \
        --data-dir ../shared/data/helm-scenarios --max-eval-instances 5

Everything runs offline: data comes from `--data-dir` (HELM's scenario-cache layout) and entries
without data are skipped with their reason. README, "The harness: HELM on the engine", shows the output layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser, add_policy_args, resolve_policy
from engine.policy import Policy
from harness import scale_out
from harness.files import write_json_atomic
from harness.helm.deployment import EngineSpec, ModelFacts, register_helm_configs, write_local_config
from harness.helm.engine_pool import engine_for, model_facts, release
from harness.manifest import build_manifest, run_settings
from harness.output import default_output, prepare_output
from harness.report.runs import write_report
from harness.report.summary import summary_table
from scenarios.nltk_fallback import ensure_punkt_tab
from scenarios.offline import link_data_dir

if TYPE_CHECKING:  # HELM is imported after the offline variables are set
    from helm.benchmark.presentation.run_entry import RunEntry

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DEFAULT_MODEL = "smollm2-135m"
AUTO_PROMPT_LEN, AUTO_GEN_LEN = 512, 32  # the FlexGen paper's HELM block shape


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m harness.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", help="suite name (smoke, helm-lite, flexgen-paper) or a run-entry conf path")
    p.add_argument("--run-entries", nargs="+", metavar="ENTRY",
                   help="HELM run entries, e.g. 'mmlu:subject=anatomy' (model=text or none: runs on --model)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="named config or HF checkpoint folder")
    p.add_argument("--weights", choices=["dummy"], help="seeded random weights instead of a checkpoint")
    p.add_argument("--max-eval-instances", type=int, help="evaluation instances per run (default: HELM's)")
    p.add_argument("--num-train-trials", type=int, help="in-context example draws per run (default: HELM's)")
    p.add_argument("--data-dir", help="read-only folder in HELM's scenario-cache layout (linked, never written)")
    p.add_argument("--output", help="output folder (default: results/<suite>/<model>-<compression>-n<instances>-"
                                    "<hash of the settings that change results>)")
    p.add_argument("--resume", action="store_true", help="skip HELM runs that finished in --output")
    p.add_argument("--overwrite", action="store_true",
                   help="delete --output first when it holds runs of other settings (else that is refused)")
    p.add_argument("--compare-compression", action="store_true",
                   help="run the suite uncompressed and compressed (the --compress flags, default 4-bit weights "
                        "and cache) into OUTPUT/none and OUTPUT/<label>, then report both")
    add_policy_args(p, default_block=(8, 4))
    scale_out.add_args(p)
    return p


def _variants(policy: Policy, compare: bool) -> list[Policy]:
    """The policy alone, or with --compare-compression: uncompressed and compressed (4-bit both by default)."""
    if not compare:
        return [policy]
    plain = dataclasses.replace(policy, compress_weight=False, compress_cache=False)
    packed = policy if (policy.compress_weight or policy.compress_cache) else \
        dataclasses.replace(policy, compress_weight=True, compress_cache=True)
    return [plain, packed]


def _route_helm_logs(path: Path) -> None:
    """HELM logs every step at INFO; keep that in a file so the terminal shows our progress."""
    logger = logging.getLogger("helm")
    logger.handlers.clear()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    if args.max_eval_instances is not None and args.max_eval_instances < 1:
        raise UserError("--max-eval-instances must be at least 1")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder; pass HELM's scenario cache folder "
                        "(e.g. ../shared/data/helm-scenarios)")
    scale_out.check_args(args)
    ray = scale_out.join_cluster(args, OFFLINE_ENV) if args.workers else None

    from harness.suites import load_run_entries

    suite, entries = load_run_entries(args.suite, args.run_entries or [])
    policy = resolve_policy(args, prompt_len=AUTO_PROMPT_LEN, gen_len=AUTO_GEN_LEN)
    variants = _variants(policy, args.compare_compression)
    specs = [EngineSpec.create(args.model, args.weights, p, seed=0, gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem,
                               offload_dir=args.offload_dir) for p in variants]
    facts = model_facts(specs[0])  # an unknown model or a missing tokenizer fails here, before any folder exists
    descriptions = [e.description for e in entries]
    settings = [run_settings(s, suite, descriptions, args.max_eval_instances, args.num_train_trials) for s in specs]
    label = "compare" if args.compare_compression else policy.compression_label()
    output = Path(args.output) if args.output else default_output(suite, specs[0].slug, label, settings)
    folders = [output / v.compression_label() if args.compare_compression else output for v in variants]
    prepare_output(output, dict(zip(folders, settings, strict=True)), args.overwrite)
    code = 0
    for spec, folder, setting in zip(specs, folders, settings, strict=True):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the --output folder {folder}: {err.strerror}; pass another --output") \
                from None
        _route_helm_logs(folder / "helm.log")
        code = max(code, run_suite(spec, facts, setting, entries, folder, args, ray))
        release(spec)  # the next variant loads its own engine
    if args.shard:
        return code  # the runs are written by --merge
    if any(output.glob("**/runs/*/*/run_spec.json")):  # nothing to report when every entry was skipped
        write_report(output)
        print(f"report: {output / 'report.md'}", flush=True)
    return code


def run_suite(spec: EngineSpec, facts: ModelFacts, settings: dict, entries: list[RunEntry], output: Path,
              args: argparse.Namespace, ray=None) -> int:
    """Prepare the output folder, plan the runs, run them on one engine (or on replicas: harness.scale_out),
    print the summary; exit code."""
    from helm.benchmark.executor import ExecutionSpec
    from helm.benchmark.runner import set_benchmark_output_path
    from helm.common.authentication import Authentication
    from helm.common.cache_backend_config import SqliteCacheBackendConfig

    from harness.helm.executor import local_planning
    from harness.helm.runner import EngineRunner
    from harness.plan import plan_runs

    suite = settings["suite"]
    scenarios_dir = output / "scenarios"
    linked = link_data_dir(args.data_dir, scenarios_dir)
    punkt = ensure_punkt_tab(output / "nltk_data")
    write_json_atomic(output / "manifest.json", build_manifest(spec, settings, {
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None, "linked_scenarios": linked,
        "punkt_tab": punkt}))
    config_dir = output / "helm_config"
    write_local_config(config_dir, spec, facts)

    register_helm_configs(config_dir)
    set_benchmark_output_path(str(output))
    run_specs, skipped = plan_runs(entries, spec.deployment, str(scenarios_dir), args.max_eval_instances,
                                   args.num_train_trials)
    print(f"{suite}: {len(run_specs)} runs on {spec.deployment}, {len(skipped)} skipped; output in {output}",
          flush=True)
    if run_specs:
        (config_dir / "cache").mkdir(parents=True, exist_ok=True)
        execution = ExecutionSpec(url=None, auth=Authentication(""), local_path=str(config_dir), parallelism=1,
                                  sqlite_cache_backend_config=SqliteCacheBackendConfig(str(config_dir / "cache")))

        def make_runner(planning=local_planning) -> EngineRunner:
            with contextlib.redirect_stdout(io.StringIO()):  # HELM prints its credentials lookups
                return EngineRunner(execution, str(output), suite, skip_instances=False, cache_instances=False,
                                    cache_instances_only=False, skip_completed_runs=args.resume,
                                    exit_on_error=False, planning=planning)

        if args.shard:
            return scale_out.as_shard(make_runner, run_specs, spec, args, output)
        if ray is not None:
            runner = scale_out.on_ray(ray, make_runner, run_specs, spec, args)
        elif args.merge:
            runner = scale_out.merged(make_runner, spec, output)
        else:
            print(f"loading {spec.model} ...", flush=True)
            engine_for(spec)
            runner = make_runner()
        for i, run_spec in enumerate(run_specs, 1):
            print(f"[{i}/{len(run_specs)}] {run_spec.name}", flush=True)
            runner.run_all([run_spec])
        outcomes = runner.outcomes
    else:
        outcomes = {}

    statuses = [(s.name, outcomes.get(s.name, "not run")) for s in run_specs]
    print("\n" + summary_table(output, suite, statuses, [(s.entry, s.reason) for s in skipped]), flush=True)
    failed = [n for n, o in outcomes.items() if o.startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed; details in {output / 'helm.log'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
