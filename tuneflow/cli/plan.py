"""`tuneflow plan --config X [--set K=V] [--gpu-memory 24GiB] [--json]`: the memory plan per rank (docs/memory.md);
exit status 1 when it does not fit the GPU."""

from __future__ import annotations

import argparse
import json
import sys

from tuneflow.cli.common import add_config_arguments
from tuneflow.core.config import parse_size
from tuneflow.core.loading import load_config
from tuneflow.memory.auto import largest_batch_that_fits, largest_tokens_that_fit, plan_problems, resolve_auto_batches
from tuneflow.memory.estimate import Settings, estimate, resolve_world_size, visible_gpu_memory
from tuneflow.memory.render import render
from tuneflow.memory.shape import ModelShape
from tuneflow.sources.model_config import read_model_config


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. 24GiB, 80GB)") from None


def add_plan_command(subparsers) -> argparse.ArgumentParser:
    """Add ``tuneflow plan`` to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="estimate peak GPU memory per rank (reads only the model's config.json)",
                              description="Estimate the peak GPU memory per training rank from the model's "
                                          "config.json alone; see docs/memory.md for the formulas. Exit status 1 "
                                          "when it does not fit the GPU.")
    add_config_arguments(p)
    p.add_argument("--gpu-memory", type=_size, metavar="SIZE",
                   help="memory of one GPU, e.g. 24GiB or 80GB (default: train.gpu_memory, else the visible GPU's, "
                        "via torch.cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON line (bytes) instead of the table")
    p.set_defaults(fn=cmd_plan)
    return p


def cmd_plan(args) -> int:
    cfg = load_config(args.config, args.set)
    model_config = read_model_config(cfg)
    shape = ModelShape.from_config(model_config)
    gpu_memory = args.gpu_memory
    if gpu_memory is None:
        gpu_memory = parse_size(cfg.train.gpu_memory) if cfg.train.gpu_memory else visible_gpu_memory()
    world = resolve_world_size(cfg)
    cfg, chosen = resolve_auto_batches(cfg, model_config, gpu_memory, world_size=world)
    p = estimate(shape, Settings.from_config(cfg, world), gpu_memory)
    problems = plan_problems(cfg, model_config, gpu_memory, world_size=world)
    if args.json:
        print(json.dumps(p.to_json()), flush=True)
    else:
        find = largest_tokens_that_fit if cfg.train.tokens_per_batch is not None else largest_batch_that_fits
        largest = find(cfg, model_config, gpu_memory, world_size=world) if gpu_memory else None
        print(render(p, cfg.model.name_or_path, largest), flush=True)
    for line in chosen:
        print(f"tuneflow: {line}", file=sys.stderr)
    for problem in problems:
        print(f"tuneflow: {problem}", file=sys.stderr)
    return 1 if p.fits is False or problems else 0
