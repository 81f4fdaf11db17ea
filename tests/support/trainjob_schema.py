"""The Kubeflow TrainJob CRD vendored in infra/k8s/crds, strict: unknown fields refused, as
`kubectl apply --validate=strict` refuses them."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

CRD = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "crds" / "trainer.kubeflow.org_trainjobs.yaml"


def strict_crd_schema(node):
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` refuses them."""
    node = copy.deepcopy(node)

    def walk(n):
        if isinstance(n, dict):
            if n.get("type") == "object" and "properties" in n and "additionalProperties" not in n \
                    and not n.get("x-kubernetes-preserve-unknown-fields"):
                n["additionalProperties"] = False
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)
    walk(node)
    return node


def strict_trainjob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "TrainJob" and crd["spec"]["group"] == "trainer.kubeflow.org"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["served"] and version["storage"]
    return jsonschema.Draft7Validator(strict_crd_schema(version["schema"]["openAPIV3Schema"]))


def assert_valid_trainjob(validator, doc):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    assert doc["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and doc["kind"] == "TrainJob"
