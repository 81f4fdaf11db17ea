"""`tuneflow demo-assets --out demo/assets`: the tiny random model and instruction dataset of `make demo` (offline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_demo_assets(args: argparse.Namespace) -> int:
    from tuneflow.modeling.demo import build

    paths = build(args.out, args.rows, args.lang, args.arch)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo-assets", help="write a tiny random model and an instruction dataset (make demo)")
    p.add_argument("--out", type=Path, required=True, help="the folder: <out>/model and <out>/data/train.json")
    p.add_argument("--rows", type=int, default=240, help="dataset rows")
    p.add_argument("--lang", choices=["en", "zh"], default="en", help="the dataset's language")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="the model's architecture")
    p.set_defaults(fn=cmd_demo_assets)
