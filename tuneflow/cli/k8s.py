"""`tuneflow k8s render` prints the TrainJob of a config; `tuneflow k8s node` is the command of each TrainJob pod."""

from __future__ import annotations

import argparse

import yaml

from tuneflow.cli.common import add_config_arguments
from tuneflow.core.loading import load_config
from tuneflow.placement.kubernetes.manifest import render_trainjob


def cmd_render(args: argparse.Namespace) -> int:
    manifest = render_trainjob(load_config(args.config, args.set), args.image, name=args.name,
                               namespace=args.namespace, gpus_per_node=args.gpus_per_node, nnodes=args.nnodes,
                               tracking_uri=args.tracking_uri)
    if args.header:
        print(args.header.rstrip())
    print(yaml.safe_dump(manifest, sort_keys=False, width=120), end="")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from tuneflow.placement.kubernetes.node import run_node

    return run_node()


def add_k8s_command(sub) -> None:
    k8s = sub.add_parser("k8s", help="multi-node training as a Kubeflow TrainJob (docs/infrastructure.md)")
    k8s = k8s.add_subparsers(dest="action", required=True)
    render = k8s.add_parser("render", help="print the TrainJob for a config as YAML")
    add_config_arguments(render)
    render.add_argument("--image", required=True, help="the tuneflow GPU image as the cluster pulls it")
    render.add_argument("--gpus-per-node", type=int, default=None, help="required when train.nproc_per_node is auto")
    render.add_argument("--nnodes", type=int, default=None, help="nodes (default: train.nnodes)")
    render.add_argument("--name", default=None, help="TrainJob name (default: from run_name)")
    render.add_argument("--namespace", default="tuneflow")
    render.add_argument("--tracking-uri", default=None, help="MLflow as the pods reach it")
    render.add_argument("--header", default=None, help=argparse.SUPPRESS)
    render.set_defaults(fn=cmd_render)
    k8s.add_parser("node", help="run one TrainJob node (inside the pod)").set_defaults(fn=cmd_node)
