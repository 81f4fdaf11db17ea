"""Before any work starts: can this process use the Prefect and MLflow servers it is pointed at?

    tuneflow run --config ...          # checks PREFECT_API_URL and the tracking URI first
    tuneflow worker --pool cpu         # checks both, then becomes `prefect worker start --pool cpu`

An authenticated server (`make stack`, docs/stack.md) answers a request without credentials, or with wrong ones,
with 401. Left alone, Prefect and MLflow report that deep inside a traceback, after work has begun. Here it is one
line that names the server and the variables to set, and never the credentials themselves.

Prefect's API auth (prefect 3.8, `prefect/server/api/server.py`): the server with `PREFECT_SERVER_API_AUTH_STRING`
refuses every request but `GET /api/health` and `/api/ready` whose `Authorization: Basic base64(<auth string>)`
differs; clients send `PREFECT_API_AUTH_STRING`. MLflow's basic auth (`mlflow server --app-name basic-auth`) refuses
every route but `/health` and static files without `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`.
"""

from __future__ import annotations

import base64
import os

import httpx

from tuneflow.core.errors import TuneflowError

TIMEOUT = 10.0


class ServerRefused(TuneflowError, RuntimeError):
    """A server is unreachable or refused this process's credentials; the message says which and what to set."""


def _get(url: str, headers: dict[str, str], server: str, setting: str) -> httpx.Response:
    try:
        return httpx.get(url, headers=headers, timeout=TIMEOUT, follow_redirects=True)
    except httpx.HTTPError as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
        raise ServerRefused(f"cannot reach the {server} server at {url.split('/api/')[0]} "
                            f"(check {setting}): {reason}") from None


def check_prefect(url: str | None = None, auth_string: str | None = None) -> None:
    """Raise ServerRefused unless the Prefect API at ``url`` (default: PREFECT_API_URL) accepts this process.

    No URL means Prefect's temporary local server, which needs no credentials: nothing to check."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

    url = (url or PREFECT_API_URL.value() or "").rstrip("/")
    if not url:
        return
    auth_string = auth_string if auth_string is not None else PREFECT_API_AUTH_STRING.value()
    api_key = PREFECT_API_KEY.value()
    headers = {}
    if auth_string:
        headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # Any route but /health needs the credentials; /admin/version is the one Prefect's own clients check first.
    response = _get(f"{url}/admin/version", headers, "Prefect", "PREFECT_API_URL")
    if response.status_code in (401, 403):
        what = ("refused PREFECT_API_AUTH_STRING" if auth_string else "requires authentication")
        raise ServerRefused(f"the Prefect server at {url} {what} (HTTP {response.status_code}): set "
                            "PREFECT_API_AUTH_STRING to its auth string ('user:password', the server's "
                            "PREFECT_SERVER_API_AUTH_STRING; `make stack` writes it to .stack/env)")


def check_mlflow(uri: str | None = None) -> None:
    """Raise ServerRefused unless the MLflow tracking server at ``uri`` (default: MLFLOW_TRACKING_URI) accepts this
    process. A local store (a file or a database URI) needs no credentials: nothing to check."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or "").rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {}
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    response = _get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", headers, "MLflow",
                    "MLFLOW_TRACKING_URI")
    if response.status_code == 401:
        what = ("refused MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" if headers
                else "requires authentication")
        raise ServerRefused(f"the MLflow server at {uri} {what} (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD to a user of that server (`make stack` writes them to "
                            ".stack/env)")
    if response.status_code == 403:
        raise ServerRefused(f"the MLflow server at {uri} denied user {user!r} (HTTP 403): ask its admin for "
                            "access, or set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to another user")


def check_servers(tracking_uri: str | None = None) -> None:
    """Both checks, Prefect first: what `tuneflow run` and `tuneflow worker` do before anything else."""
    check_prefect()
    check_mlflow(tracking_uri)
