"""Offline checks of the Docker Compose stack and its Dockerfiles (the Kubernetes side: test_kubernetes.py), in
seconds: the files against the specs their tools use (the Compose spec `docker compose` validates with, the
Dockerfiles as dockerfile-parse reads them) and the stack's own rules. The stack is built, started and used for real
in tests/integration/test_compose.py.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
OVERRIDES = (INFRA / "compose.gpu.yaml", INFRA / "compose.minio.yaml")
ENV_EXAMPLE = INFRA / ".env.example"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", re.IGNORECASE)


# --- Docker Compose -------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>(?:[^{}]|\{[^{}]*\})*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(ValueError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        present, val = name in env, env.get(name, "")
        if op in (":-", "-"):
            use_default = (not val) if op == ":-" else not present
            return interpolate(arg, env) if use_default else val
        if op in (":?", "?"):
            if (not val) if op == ":?" else not present:
                raise MissingVariable(f"{name}: {arg}")
            return val
        return val

    return _VAR.sub(sub, value)


def compose_variables(value) -> dict[str, str | None]:
    """Every ${VAR...} Compose interpolates in a parsed file, with its operator (None for a plain reference)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        found = {}
        for item in value:
            found.update({k: v for k, v in compose_variables(item).items() if k not in found})
        return found
    found: dict[str, str | None] = {}
    for m in _VAR.finditer(value if isinstance(value, str) else ""):
        if m.group("name"):
            found.setdefault(m.group("name"), m.group("op"))
            if m.group("arg"):
                found.update({k: v for k, v in compose_variables(m.group("arg")).items() if k not in found})
    return found


def env_example() -> dict[str, str]:
    return {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}


def compose_raw(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def compose_schema() -> dict:
    # check-jsonschema bundles the Compose spec's schema (compose-spec/compose-spec, schema/compose-spec.json).
    source = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(source.read_text())


def compose_validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def resolved_compose(env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict:
    return interpolate(compose_raw(path), env_example() if env is None else env)


def test_compose_files_match_the_compose_spec_before_and_after_interpolation():
    validator = compose_validator()
    for path in (COMPOSE, *OVERRIDES):
        for doc in (compose_raw(path), resolved_compose(path=path)):
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, (path.name, errors)
        # Compose v1 (Debian's docker-compose 1.29) refuses a top-level `name`: the project name comes from the env.
        assert "name" not in compose_raw(path), path.name
    assert env_example()["COMPOSE_PROJECT_NAME"] == "tuneflow"
    # The schema is strict enough to catch a misspelt key and a wrong type.
    broken = resolved_compose()
    broken["services"]["prefect"]["healthchek"] = broken["services"]["prefect"].pop("healthcheck")
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    messages = [e.message for e in validator.iter_errors(broken)]
    assert any("healthchek" in m for m in messages) and any("service_ready" in m for m in messages), messages


def test_compose_services_dependencies_and_healthchecks():
    services = resolved_compose()["services"]
    assert set(services) == {"postgres", "prefect", "mlflow", "prefect-deploy", "cpu-worker", "gpu-worker"}
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"prefect-deploy"}
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            wanted = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert cond["condition"] == wanted, f"{name} -> {dep}: {cond}"
            assert dep in one_shot or "healthcheck" in services[dep], \
                f"{name} waits for {dep}, which has no healthcheck"
        if name not in one_shot:
            assert "healthcheck" in service, f"{name} has no healthcheck"
    # Prefect and MLflow keep their state in Postgres; MLflow's artifacts go to a volume, served by MLflow.
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://prefect@postgres:5432/")
    cmd = services["mlflow"]["command"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://mlflow@postgres:5432/")
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlflow/artifacts"
    assert "mlflow-artifacts:/mlflow/artifacts" in services["mlflow"]["volumes"]
    # With infra/compose.minio.yaml: the MinIO bucket instead, once minio-init made it.
    minio = resolved_compose(path=INFRA / "compose.minio.yaml")["services"]
    assert minio["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    assert minio["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert minio["mlflow"]["depends_on"] == {"minio-init": {"condition": "service_completed_successfully"}}
    assert minio["minio-init"]["restart"] == "no" and "healthcheck" in minio["minio"]
    # The workers: one per pool, on the authenticated servers, the GPU one with the GPUs reserved.
    for pool in ("cpu", "gpu"):
        worker = services[f"{pool}-worker"]
        assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", pool]
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"
        assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert any(v.endswith(":/cache") for v in worker["volumes"])
        assert worker["environment"]["HF_HUB_CACHE"].startswith("/cache/")
    # Without GPUs the stack starts (nothing reserved); infra/compose.gpu.yaml reserves them for the gpu worker.
    assert "deploy" not in services["gpu-worker"] and "deploy" not in services["cpu-worker"]
    gpu = resolved_compose(path=INFRA / "compose.gpu.yaml")["services"]
    devices = gpu["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["gpu-worker"]["build"]["dockerfile"] == "infra/docker/gpu.Dockerfile"
    assert gpu["gpu-worker"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/cu130")


def test_compose_publishes_only_prefect_and_mlflow_on_the_configured_interface():
    raw = compose_raw()["services"]
    published = {name for name, s in raw.items() if s.get("ports")}
    assert published == {"prefect", "mlflow"}, "Postgres and the workers must not be published"
    assert not any(s.get("ports") for s in compose_raw(INFRA / "compose.minio.yaml")["services"].values())
    for name, port in (("prefect", 4200), ("mlflow", 5000)):
        (mapping,) = raw[name]["ports"]
        assert mapping.startswith("${PUBLISH_HOST:-127.0.0.1}:"), mapping
        assert interpolate(mapping, {}) == f"127.0.0.1:{port}:{port}"
    assert interpolate(raw["prefect"]["ports"][0], {"PUBLISH_HOST": "10.0.0.5"}).startswith("10.0.0.5:")


def test_compose_authentication_is_on_for_servers_and_clients():
    services = resolved_compose()["services"]
    prefect, mlflow = services["prefect"]["environment"], services["mlflow"]["environment"]
    example = env_example()
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == example["PREFECT_AUTH_STRING"]
    assert mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"] == example["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    ini_mount = [v for v in services["mlflow"]["volumes"] if v.endswith(":/etc/mlflow/basic_auth.ini:ro")]
    assert ini_mount and (INFRA / ini_mount[0].split(":")[0]).is_file()
    for name in ("cpu-worker", "gpu-worker", "prefect-deploy"):
        env = services[name]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == example["PREFECT_AUTH_STRING"], name
    for name in ("cpu-worker", "gpu-worker"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == example["MLFLOW_ADMIN_USERNAME"]
        assert env["MLFLOW_TRACKING_PASSWORD"] == example["MLFLOW_ADMIN_PASSWORD"]
    # The S3 credentials stay on the MLflow server: no client gets them.
    minio = resolved_compose(path=INFRA / "compose.minio.yaml")["services"]
    holders = {n for n, s in minio.items() for k in s.get("environment", {}) if k.startswith("AWS_")}
    assert holders == {"mlflow"}


def test_every_compose_variable_is_documented_and_every_secret_is_required():
    variables = compose_variables([compose_raw(path) for path in (COMPOSE, *OVERRIDES)])
    example = env_example()
    undocumented = sorted(set(variables) - set(example))
    assert not undocumented, f"not in infra/.env.example: {undocumented}"
    unused = sorted(set(example) - set(variables) - {"COMPOSE_PROJECT_NAME"})  # read by Compose itself
    assert not unused, f"in infra/.env.example but not used by infra/compose*.yaml: {unused}"
    for name, op in variables.items():
        if SECRET_NAME.search(name) and name != "HF_TOKEN":  # HF_TOKEN is optional: public models need none
            assert op == ":?", f"${{{name}}} is a secret: use ${{{name}:?message}} so that a missing one fails"
    # A missing secret stops Compose with its message; with every secret set, it resolves.
    for name, path in (("POSTGRES_PASSWORD", COMPOSE), ("PREFECT_AUTH_STRING", COMPOSE),
                       ("MLFLOW_ADMIN_PASSWORD", COMPOSE), ("MLFLOW_S3_SECRET_KEY", INFRA / "compose.minio.yaml")):
        env = {k: v for k, v in example.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            resolved_compose(env, path)
    for path in (COMPOSE, *OVERRIDES):
        resolved_compose(path=path)


def test_no_secret_literal_in_compose_or_the_files_it_mounts():
    example = env_example()
    for name, value in example.items():
        if SECRET_NAME.search(name):
            assert value in ("", "change-me") or value.endswith(":change-me"), f"{name} in .env.example: {value!r}"
    services = [item for path in (COMPOSE, *OVERRIDES) for item in compose_raw(path)["services"].items()]
    for name, service in services:
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", value), \
                    f"{name}.environment.{key} must come from the environment, not {value!r}"
        command = json.dumps(service.get("command", "")) + json.dumps(service.get("entrypoint", ""))
        assert not re.search(r"://[^/@\s\"]+:[^/@\s\"]+@", command), f"{name}: a password in a URL"
    # The mounted and copied files carry no credentials either.
    for path in [*(INFRA / "docker").iterdir(), COMPOSE, *OVERRIDES]:
        text = path.read_text()
        assert not re.search(r"(?im)^\s*(admin_password|password)\s*=\s*\S", text), path
        assert not re.search(r"://[^/@\s]+:[^/@\s$]+@", text), f"{path}: a password in a URL"


def test_the_env_file_make_writes_has_random_secrets_and_the_settings_of_the_environment(tmp_path, monkeypatch):
    from infra.compose import DEMO_ASSETS, client_env, ensure_env_file

    monkeypatch.setenv("PREFECT_PORT", "14321")
    monkeypatch.setenv("POSTGRES_IMAGE", "tuneflow-postgres:15")
    for name in ("MLFLOW_PORT", "TUNEFLOW_DATA_DIR", "COMPOSE_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "compose.env"
    assert ensure_env_file(path, "tuneflow-x") and path.stat().st_mode & 0o777 == 0o600
    values = dotenv_values(path)
    assert set(values) == set(env_example())
    secret_values = [v for k, v in values.items() if SECRET_NAME.search(k) and k != "HF_TOKEN"]
    assert secret_values and not any("change-me" in v for v in secret_values)
    assert len(set(secret_values)) == len(secret_values), "each secret its own"
    assert values["PREFECT_AUTH_STRING"].startswith("admin:")
    assert values["POSTGRES_IMAGE"] == "tuneflow-postgres:15" and values["MLFLOW_PORT"] == "5000"
    # A later plain `docker compose --env-file` starts the same stack: its project, the demo's folder mounted.
    assert values["COMPOSE_PROJECT_NAME"] == "tuneflow-x" and values["TUNEFLOW_DATA_DIR"] == str(DEMO_ASSETS.parent)
    client = client_env(path)
    assert client["PREFECT_API_URL"] == "http://127.0.0.1:14321/api"
    assert client["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert client["PREFECT_API_AUTH_STRING"] == values["PREFECT_AUTH_STRING"]
    # An existing file is the user's: never rewritten.
    before = path.read_text()
    monkeypatch.setenv("PREFECT_PORT", "1")
    assert not ensure_env_file(path, "other") and path.read_text() == before


# --- Dockerfiles ----------------------------------------------------------------------------------------------

def dockerfile(name: str) -> DockerfileParser:
    parser = DockerfileParser(str(INFRA / "docker" / name))
    return parser


def runs(parser: DockerfileParser) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == "RUN"]


@pytest.mark.parametrize("name, base", [("cpu.Dockerfile", "python:3.11-slim-bookworm"),
                                        ("gpu.Dockerfile", "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04")])
def test_worker_images_install_the_project_after_torch_and_run_as_non_root(name, base):
    parser = dockerfile(name)
    assert parser.baseimage == base
    assert ("cuda" in base) == ("cu" in parser.args["TORCH_INDEX_URL"].rsplit("/", 1)[-1])
    steps = runs(parser)
    torch = next(i for i, s in enumerate(steps) if 'pip install "torch==${TORCH_VERSION}"' in s)
    deepspeed = next(i for i, s in enumerate(steps) if "deepspeed" in s)
    project = next(i for i, s in enumerate(steps) if re.search(r"pip install --no-build-isolation \.(\s|$)", s))
    assert torch < deepspeed < project, "torch first, then DeepSpeed against it, then the project (make install)"
    assert "--no-build-isolation" in steps[deepspeed]
    assert parser.args["TORCH_VERSION"] == re.search(r'TORCH_VERSION \?= (\S+)', (ROOT / "Makefile").read_text())[1]
    # Everything the package and the deployments need is copied in, and exists in the checkout.
    copied = [i["value"].split()[0] for i in parser.structure if i["instruction"] == "COPY"]
    copied += [w for i in parser.structure if i["instruction"] == "COPY" for w in i["value"].split()[1:-1]]
    for src in copied:
        assert (ROOT / src).exists(), src
    assert {"pyproject.toml", "tuneflow", "flows", "tasks", "deployments", "infra"} <= set(copied)
    users = [i["value"].strip() for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"
    assert parser.structure[-1]["instruction"] == "CMD" and "worker" in parser.structure[-1]["value"]
    # The build context is the repository root: .dockerignore sends only what the image installs (no .venv).
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "**" and "!tuneflow/**" in ignore
    # env files with secrets stay out, whatever their name beside infra/.env.example
    assert {"infra/.env*", "infra/*.env"} <= set(ignore) and ignore[-1] == "!infra/.env.example"


def test_mlflow_image_has_the_auth_app_the_database_driver_and_s3():
    parser = dockerfile("mlflow.Dockerfile")
    install = " ".join(runs(parser))
    assert "mlflow[auth]==${MLFLOW_VERSION}" in install and "psycopg2" in install and "boto3" in install
    users = [i["value"].strip() for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1] != "root"
