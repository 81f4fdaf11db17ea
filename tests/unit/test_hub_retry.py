"""tuneflow's one retry policy for Hub metadata calls (tuneflow.sources.hub.hub_call), with huggingface_hub's own
exceptions: transient failures are retried with backoff, an unreachable endpoint and the Hub's refusals never are."""

from __future__ import annotations

import logging

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from tuneflow.sources import hub
from tuneflow.sources.hub import Problem, Source, hub_call

SRC = Source("model", "org/model", "main")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(hub, "RETRY_WAIT", (0.01, 0.02))


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "http://hub.test/api/models/org/model")
    return HfHubHTTPError(f"{status} Server Error", response=httpx2.Response(status, request=request))


def failing(errors: list[Exception], result="ok"):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return call, calls


@pytest.mark.parametrize("error", [http_error(503), http_error(429), http_error(500),
                                   httpx2.ReadTimeout("timed out"), httpx2.RemoteProtocolError("peer closed")])
def test_transient_failures_are_retried_with_a_warning_each(error, caplog):
    call, calls = failing([error, error])
    with caplog.at_level(logging.WARNING):
        assert hub_call(call, SRC, logging.getLogger("test")) == "ok"
    assert len(calls) == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and warnings[0].startswith("model org/model: Hub request failed (") and "retry 1" in \
        warnings[0], warnings


def test_a_download_is_not_wrapped_in_a_second_retry_loop():
    call, calls = failing([http_error(503)])
    with pytest.raises(Problem, match=r"^model org/model: the Hub at \S+ failed: 503"):
        hub_call(call, SRC, logging.getLogger("test"), retry=False)  # huggingface_hub retried it already
    assert len(calls) == 1


@pytest.mark.parametrize(("error", "message"), [
    (httpx2.ConnectError("[Errno 111] Connection refused"), "cannot be reached ([Errno 111] Connection refused)"),
    (httpx2.ConnectError("[Errno -2] Name or service not known"), "cannot be reached ([Errno -2] Name or service"),
    (http_error(403), "refused the token (403); set HF_TOKEN"),
    (http_error(400), "refused the request: 400"),
])
def test_no_retry_for_what_another_try_cannot_fix(error, message):
    call, calls = failing([error])
    with pytest.raises(Problem) as raised:
        hub_call(call, SRC, logging.getLogger("test"))
    assert len(calls) == 1 and message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_an_unreachable_hub_is_found_behind_huggingface_hubs_own_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    def call():
        try:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        except httpx2.ConnectError as exc:  # as snapshot_download raises it, the connection error as its cause
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from exc

    with pytest.raises(Problem, match="cannot be reached \\(\\[Errno 111\\] Connection refused\\); check the network"):
        hub_call(call, SRC, logging.getLogger("test"), retry=False)
