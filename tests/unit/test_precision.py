"""train.precision: auto, resolved per machine (the machine passed in as data, so every branch runs here), and
nodes on mixed hardware refused before training."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from tuneflow.core.loading import load_config
from tuneflow.core.params import config_hash
from tuneflow.modeling.precision import Machine, resolve, resolved, this_machine

AMPERE = Machine(gpu="NVIDIA A100", gpu_bf16=True)
T4 = Machine(gpu="Tesla T4", gpu_bf16=False)
AVX512_BF16 = Machine(gpu=None, cpu="AVX512", cpu_bf16=True)
AVX2 = Machine(gpu=None, cpu="AVX2", cpu_bf16=False)


@pytest.mark.parametrize(("machine", "method", "deepspeed", "expected"), [
    (AMPERE, "qlora", "none", "bf16"),
    (T4, "qlora", "none", "fp16"),
    (T4, "lora", "zero2", "fp16"),
    (T4, "full", "zero2", "fp16"),  # DeepSpeed keeps the fp32 master copy
    (T4, "full", "none", "fp32"),  # fp16 without DeepSpeed has none
    (T4, "freeze", "none", "fp32"),
    (AVX512_BF16, "qlora", "none", "bf16"),
    (AVX2, "qlora", "none", "fp32"),
    (AVX2, "full", "zero3", "fp32"),
])
def test_auto_follows_the_machine(machine, method, deepspeed, expected):
    choice = resolve("auto", machine, method, deepspeed)
    assert choice.precision == expected and choice.warning is None
    assert choice.reason.startswith(f"precision auto -> {expected} on ")


def test_the_reason_names_the_machine():
    assert resolve("auto", AVX2).reason == ("precision auto -> fp32 on CPU AVX2 (no native bf16); bf16 is emulated "
                                            "there and runs 30-40x slower than fp32")
    assert resolve("auto", AMPERE).reason == "precision auto -> bf16 on GPU NVIDIA A100 (with bf16)"


@pytest.mark.parametrize("machine", [AMPERE, T4, AVX512_BF16, AVX2])
@pytest.mark.parametrize("explicit", ["bf16", "fp16", "fp32"])
def test_an_explicit_precision_is_kept(machine, explicit):
    assert resolve(explicit, machine).precision == explicit


def test_explicit_bf16_on_a_cpu_without_it_trains_with_a_warning_that_says_why():
    choice = resolve("bf16", AVX2)
    assert choice.precision == "bf16"
    assert "CPU AVX2 (no native bf16)" in choice.warning and "30-40x slower" in choice.warning
    assert "train.precision: auto" in choice.warning
    assert resolve("bf16", AVX512_BF16).warning is None and resolve("bf16", AMPERE).warning is None


def test_the_resolved_precision_is_no_part_of_the_experiment():
    base = {"dataset": {"name_or_path": "d.json"}}
    auto = load_config(data=base)
    fp32 = load_config(data={**base, "train": {"precision": "fp32"}})
    assert resolved(auto, AVX2).precision == "fp32" and resolved(auto, AMPERE).precision == "bf16"
    # the same config on two machines is one experiment; an explicit choice is a different one
    assert config_hash(auto) == config_hash(load_config(data=base)) != config_hash(fp32)


def test_this_machine_reads_torch():
    machine = this_machine()
    import torch

    assert machine.gpu is None and machine.cpu == torch.backends.cpu.get_cpu_capability()


def test_nodes_that_resolve_differently_fail_before_training(tmp_path, tiny_assets):
    """Two nodes on loopback (gloo) whose train stages resolved 'auto' to bf16 and fp32: every rank refuses, naming
    each node's result, before the model is built (the data folder does not even exist)."""
    from tuneflow.core.ports import free_port
    from tuneflow.training.launch.launcher import WorkerFailed, launch

    port, rdzv = free_port(), uuid.uuid4().hex[:8]
    errors: dict[int, str] = {}

    def node(rank: int, precision: str) -> None:
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        spec = folder / "spec.json"
        spec.write_text(json.dumps({
            "config": {"dataset": {"name_or_path": "unused"},
                       "train": {"deepspeed": "none", "precision": precision, "nnodes": 2}},
            "model_dir": str(tiny_assets["model"]), "data_dir": str(tmp_path / "no-such-data"),
            "output_dir": str(folder)}))
        try:
            launch(spec, nproc=1, master_port=port, env={}, on_line=lambda line: None, nnodes=2, node_rank=rank,
                   master_addr="127.0.0.1", rdzv_id=rdzv, join_timeout=120)
        except WorkerFailed as exc:
            errors[rank] = str(exc)

    nodes = [threading.Thread(target=node, args=(rank, p)) for rank, p in ((0, "bf16"), (1, "fp32"))]
    for thread in nodes:
        thread.start()
    for thread in nodes:
        thread.join(timeout=300)
    assert sorted(errors) == [0, 1], errors
    for message in errors.values():
        assert "the nodes resolved train.precision differently (node 0: bf16 on CPU" in message, message
        assert "node 1: fp32 on CPU" in message and "no-such-data" not in message, message
