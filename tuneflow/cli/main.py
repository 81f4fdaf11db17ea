"""The tuneflow command line.

    tuneflow run --config configs/demo.yaml [--set train.learning_rate=1e-4 ...]
    tuneflow submit --config configs/my.yaml [--wait]   # to the team's Prefect server (PREFECT_API_URL)
    tuneflow validate --config configs/my.yaml [--config-only]
    tuneflow plan --config configs/my.yaml [--gpu-memory 24GiB] [--json]
    tuneflow retrain --config configs/demo.yaml --set registry.model_name=demo [--refreeze-eval-set]
    tuneflow emit-dataset-updated --dataset org/name [--revision <sha>]
    tuneflow generate --model runs/<run>/export --prompt "Add 2 and 3." [--stream]
    tuneflow generate --model models:/<registered name>@champion --prompt "..."
    tuneflow generate --model <base> --adapter runs/<run>/train/adapter --prompt "..."
    tuneflow cache prune --keep-days 14 [--dry-run]   # this machine's $TUNEFLOW_CACHE
    tuneflow worker --pool cpu          # checks the Prefect and MLflow credentials, then `prefect worker start`
    tuneflow stack start|stop|status    # the local team stack (make stack)
    tuneflow k8s render --config ... --image ...   # the Kubeflow TrainJob of a config
    tuneflow demo-assets --out demo/assets         # the tiny offline model and dataset of make demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tuneflow.cli.common import add_config_arguments, check_trains_here, load, print_json_result
from tuneflow.cli.demo import add_demo_command
from tuneflow.cli.k8s import add_k8s_command
from tuneflow.cli.plan import add_plan_command
from tuneflow.cli.remote import PIPELINE_DEPLOYMENT, TRAIN_DEPLOYMENT, submit
from tuneflow.cli.stack import add_stack_command
from tuneflow.cli.sweep import add_sweep_command
from tuneflow.cli.worker import add_worker_command
from tuneflow.core.errors import TuneflowError


def cmd_validate(args) -> int:
    cfg = load(args)
    print(f"{args.config}: config valid ({cfg.train.method}, deepspeed {cfg.train.deepspeed})", flush=True)
    if args.config_only:
        return 0
    import logging

    from tuneflow.sources.preflight import preflight

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger = logging.getLogger("tuneflow.sources.preflight")
    logger.setLevel(logging.INFO)
    from tuneflow.core.config import tracking_uri

    checked = preflight(cfg, logger, tracking_uri(cfg.tracking.uri))

    def where(src) -> str:
        return ("local" if src.local else f"MLflow model {src.sha}" if src.registry else f"commit {src.sha}" if src.sha
                else "cached")

    datasets = ", ".join(f"{source.name_or_path} ({where(src)})"
                         for (_, source), src in zip(cfg.all_sources, checked.datasets, strict=True))
    print(f"ready to run: model {cfg.model.name_or_path} ({where(checked.model)}), "
          f"dataset{'s' if len(checked.datasets) > 1 else ''} {datasets}")
    return 0


def cmd_run(args) -> int:
    cfg = load(args)  # every config problem is reported here, before Prefect or any model starts
    check_trains_here(cfg)  # `tuneflow run` trains on this machine only
    from flows.finetune import finetune

    try:
        data = finetune(cfg, run_dir=args.run_dir)
    except Exception as exc:
        print(f"tuneflow: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_results(data)
    print(Path(data["run_dir"]) / "summary.json")
    return 0


def print_results(summary: dict, local: bool = True) -> None:
    """The held-out metrics, base -> tuned, and where the run shows in MLflow (``local``: the run's folders are on
    this machine)."""
    from tuneflow.tracking.runs import run_url

    metrics = summary.get("metrics", {})
    base = metrics.get("base", {})
    print("\nheld-out metrics (base -> tuned):")
    for key in ("eval_loss", "bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        if key in metrics:
            print(f"  {key:9s} {base.get(key, float('nan')):9.4f} -> {metrics[key]:.4f}")
    if "export_parity" in metrics:  # the export: a folder here, or (from a worker) its MLflow model
        where = summary.get("export_dir") if local else summary.get("model_uri")
        print(f"  export parity {metrics['export_parity']:.2f}  ({where})")
    mlflow = summary["mlflow"]
    link = run_url(mlflow["tracking_uri"], mlflow["experiment_id"], mlflow["parent_run_id"])
    serve = "" if link.startswith(mlflow["tracking_uri"]) else \
        f".venv/bin/mlflow ui --backend-store-uri {mlflow['tracking_uri']}, then "
    print(f"MLflow: {serve}open {link}")


def cmd_submit(args) -> int:
    """Send the pipeline to the team's Prefect server as a flow run of its deployment; with --wait, follow it."""
    return submit(load(args), args, "tuneflow run", _follow)


def _follow(flow_run_id, cfg) -> int:
    """Print the pipeline's and its stages' states as they change; then its results, found in MLflow."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tuneflow.core.progress import StateLog

    log = StateLog(lambda text: print(f"{time.strftime('%H:%M:%S')} {text}", flush=True))

    def show(what: str, state: str) -> None:
        log.note(what, f"{what}: {state}")

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            show("pipeline", run.state.name)
            for task in sorted(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                    any_=[flow_run_id]))), key=lambda t: t.expected_start_time or t.created):
                if ".run_deployment." in task.task_key:  # Prefect's stand-in task for a training flow run
                    show(f"    training run {task.name}", task.state.name)
                else:
                    show(f"  {task.name.rsplit('-', 1)[0]}", task.state.name)
            if run.state.is_final():
                break
            time.sleep(2)
    if not run.state.is_completed():
        print(f"tuneflow: flow run {run.name} {run.state.name}: {run.state.message or 'no message'}", file=sys.stderr)
        return 1
    summary = _summary_in_mlflow(cfg, flow_run_id)
    if summary:
        print_results(summary, local=False)
    return 0


def _summary_in_mlflow(cfg, flow_run_id) -> dict | None:
    """summary.json of the pipeline's MLflow parent run, when this machine reaches the tracking server."""
    from tuneflow.core.config import tracking_uri

    uri = tracking_uri(cfg.tracking.uri)
    if not uri.startswith(("http://", "https://")):
        print("set MLFLOW_TRACKING_URI to the workers' tracking server to see the results here", file=sys.stderr)
        return None
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'") \
        if experiment else []
    if not runs:
        print(f"no MLflow run of flow run {flow_run_id} at {uri}", file=sys.stderr)
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    summary = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "summary.json")).read_text())
    # The link to the run: the server as this machine reaches it (the workers' name for it may be the stack's own,
    # e.g. http://mlflow:5000 inside Compose).
    summary["mlflow"]["tracking_uri"] = uri
    return summary


def cmd_retrain(args) -> int:
    cfg = load(args)
    from flows.retrain import retrain
    from tuneflow.tracking.registry import Registry, RegistryProblem
    from tuneflow.tracking.servers import ServerRefused, check_servers

    def checked_retrain() -> dict:
        check_servers(cfg.tracking.uri)  # refused credentials, no registry.model_name, a store without a registry:
        Registry(cfg)                    # one line each, before Prefect starts
        return retrain(cfg, refreeze_eval_set=args.refreeze_eval_set)

    return print_json_result("retrain", checked_retrain, passes=(ServerRefused, RegistryProblem))


def cmd_emit_dataset_updated(args) -> int:
    """Tell a Prefect server that a dataset has a new revision; tuneflow-retrain/scheduled runs on it."""
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise TuneflowError("set PREFECT_API_URL to the Prefect server the retrain deployment is on, e.g. "
                            "http://127.0.0.1:4200/api")
    event = Event(event="tuneflow.dataset.updated",
                  resource={"prefect.resource.id": f"tuneflow.dataset.{args.dataset}",
                            "prefect.resource.name": args.dataset},
                  payload={"dataset": args.dataset, "revision": args.revision})

    async def emit() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    try:
        asyncio.run(emit())
    except Exception as exc:
        print(f"tuneflow: the Prefect server at {PREFECT_API_URL.value()} did not take the event: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"event": event.event, "id": str(event.id), **event.payload}))
    return 0


def cmd_generate(args) -> int:
    from tuneflow.core.config import TuneflowConfig
    from tuneflow.modeling.generation import generate, stream
    from tuneflow.modeling.load import device, load_pretrained, load_tokenizer, load_trained
    from tuneflow.modeling.precision import compute_dtype

    model_dir = args.model
    if model_dir.startswith("models:/"):  # a model logged by the export stage, e.g. models:/my-model@champion
        from tuneflow.core.config import tracking_uri
        from tuneflow.sources.registered import registered_folder

        model_dir = str(registered_folder(model_dir, tracking_uri(None)))
    cfg = TuneflowConfig.model_validate({"dataset": {"name_or_path": "-"}, "train": {"method": "lora",
                                         "precision": args.dtype}, "model": {"name_or_path": model_dir}})
    tokenizer = load_tokenizer(model_dir, cfg)
    device_map = {"": device()}
    if args.adapter:
        model = load_trained(model_dir, args.adapter, cfg, device_map)
    else:
        model = load_pretrained(model_dir, cfg, compute_dtype(cfg), device_map)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    if args.stream:
        for piece in stream(model, tokenizer, messages, args.max_new_tokens):
            print(piece, end="", flush=True)
        print()
    else:
        print(generate(model, tokenizer, [messages], args.max_new_tokens)[0])
    return 0


def cmd_cache_prune(args) -> int:
    from tuneflow.tracking.artifacts import cache_root, prune

    pruned = prune(args.keep_days, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in pruned.entries:
        print(f"{verb} {entry}")
    print(f"tuneflow cache: {verb} {len(pruned.entries)} entries ({pruned.size / 2**20:.1f} MiB) unused for "
          f"{args.keep_days:g} days from {cache_root()}")
    return 0


# `tuneflow run` / `retrain` without PREFECT_API_URL start Prefect's temporary server; its first start in a fresh
# PREFECT_HOME (database migrations) can take longer than Prefect's 20 s on a busy machine.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)
    parser = argparse.ArgumentParser(prog="tuneflow", description="QLoRA fine-tuning pipeline (Prefect + MLflow)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("run", cmd_run, "run the whole pipeline"),
                           ("validate", cmd_validate, "check a config, its model and its dataset"),
                           ("retrain", cmd_retrain, "retrain if anything changed, register, promote the winner; "
                            "prints the decision as JSON on the last line")):
        p = sub.add_parser(name, help=help_)
        add_config_arguments(p)
        p.set_defaults(fn=fn)
    sub.choices["run"].add_argument("--run-dir", help="use this run folder instead of a new one")
    p = sub.add_parser("submit", help="run the pipeline on the team's Prefect server (PREFECT_API_URL): a flow run "
                       f"of {PIPELINE_DEPLOYMENT}, training on {TRAIN_DEPLOYMENT}")
    add_config_arguments(p)
    p.add_argument("--deployment", default=PIPELINE_DEPLOYMENT, help="the pipeline deployment (default: %(default)s)")
    p.add_argument("--train-deployment", default=TRAIN_DEPLOYMENT,
                   help="where training runs (default: %(default)s); '' trains on the pipeline's own worker")
    p.add_argument("--wait", action="store_true", help="follow the run's stages until it ends; exit 1 if it fails")
    p.set_defaults(fn=cmd_submit)
    sub.choices["validate"].add_argument(
        "--config-only", action="store_true",
        help="check the config alone; by default the model and dataset are checked too (nothing large is downloaded)")
    sub.choices["retrain"].add_argument(
        "--refreeze-eval-set", action="store_true",
        help="replace the registered model's frozen evaluation set with rows from this run's held-out split")
    e = sub.add_parser("emit-dataset-updated", help="emit the Prefect event tuneflow.dataset.updated "
                       "(runs tuneflow-retrain/scheduled); needs PREFECT_API_URL")
    e.add_argument("--dataset", required=True, help="the dataset's Hub repo id (or path), as in dataset.name_or_path")
    e.add_argument("--revision", help="its new commit SHA (recorded in the event's payload)")
    e.set_defaults(fn=cmd_emit_dataset_updated)
    g = sub.add_parser("generate", help="answer a prompt with an exported model or base + adapter")
    g.add_argument("--model", required=True, help="exported model folder, the base model folder, or an MLflow model "
                   "such as models:/<registered name>@champion (MLFLOW_TRACKING_URI says where)")
    g.add_argument("--adapter", help="LoRA adapter folder to put over --model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute precision; auto: bf16 where this machine has it natively, else fp16 on a GPU, fp32 "
                        "on a CPU (as train.precision)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("cache", help="this machine's cache of stage outputs ($TUNEFLOW_CACHE, default "
                       "~/.cache/tuneflow)").add_subparsers(dest="action", required=True)
    c = c.add_parser("prune", help="remove the adapters, checkpoints, models and prepared datasets no run has used "
                     "lately; a later run downloads what it needs again from MLflow")
    c.add_argument("--keep-days", type=float, required=True, help="keep what was used within this many days")
    c.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    c.set_defaults(fn=cmd_cache_prune)
    add_plan_command(sub)
    add_worker_command(sub)
    add_k8s_command(sub)
    add_stack_command(sub)
    add_demo_command(sub)
    add_sweep_command(sub)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except TuneflowError as exc:  # a problem the user can fix, in one line
        print(f"tuneflow: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
