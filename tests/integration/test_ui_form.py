"""The Prefect UI's run form of `tuneflow-finetune/on-demand`, as a user sees it in a real browser.

A real `prefect server start` (conftest's ``prefect_api``), the deployments registered with `make deploy`, and the
deployment's "Custom run" page (/deployments/deployment/<id>/run) opened in headless Chromium. The test checks
that every key of the config tree shows as a field under its section, with its description exactly as written in
tuneflow/core/config.py (read from the models, so the test follows the code), that Literal keys are dropdowns offering
their choices, and that the deployment's parameters fill the form. A full-page screenshot is kept in
test-output/prefect-run-form.png.

Needs the Python package `playwright` (its own browser download is not used) and a Chromium: Debian's
`apt-get install -y chromium`. `make test` installs both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuneflow.core.config import TuneflowConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "tuneflow-finetune/on-demand"
SCREENSHOT = REPO / "test-output" / "prefect-run-form.png"
TIMEOUT_MS = 60_000  # a 2-core CI machine renders the Vue app slowly
VIEWPORT = {"width": 1400, "height": 1000}
@pytest.fixture(scope="module")
def on_demand(chromium, prefect_api, tmp_path_factory):
    """`make deploy` against the session's Prefect server; the on-demand deployment as the API returns it."""
    from prefect.client.orchestration import get_client

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path_factory.mktemp("deployer-prefect-home")))
    done = subprocess.run(["make", "-C", str(REPO), "deploy"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"make deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    with get_client(sync_client=True) as client:  # prefect_api points this process at the server
        return client.read_deployment_by_name(DEPLOYMENT)


# ---------------------------------------------------------------------------------------------------------------
# What the form should show, derived from the code.


def label(name: str, required: bool, title: str | None = None) -> str:
    """The UI labels a property with its schema title (pydantic's: 'learning_rate' -> 'Learning Rate', or the
    parameter name for the flow's own parameters) and marks the ones that may be left empty."""
    text = title or name.replace("_", " ").title()
    return text if required else f"{text} (Optional)"


def config_fields(model: type[BaseModel] = TuneflowConfig, path: tuple[str, ...] = ("config",), keys: str = ""):
    """(labels from the form's root, dotted key, pydantic field) for every key of the config tree, sections too."""
    for name, field in model.model_fields.items():
        here = (*path, label(name, field.is_required()))
        yield here, keys + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from config_fields(field.annotation, here, f"{keys}{name}.")


def as_rendered(markdown: str) -> tuple[str, list[str]]:
    """The text the UI's markdown renderer shows for a description, and its code spans: `x` renders as the code
    element x; line breaks inside a paragraph become spaces. Anything else must come through unchanged."""
    return " ".join(re.sub(r"`([^`]+)`", r"\1", markdown).split()), re.findall(r"`([^`]+)`", markdown)


def scalar_parameters(params: dict, model: type[BaseModel] = TuneflowConfig, path=("config",), keys="config."):
    """(labels, dotted key, value) of the deployment's scalar parameters whose field is a plain str, number or
    Literal (shown as one input or dropdown; unions show as tabs, booleans as toggles)."""
    for name, value in params.items():
        field = model.model_fields[name]
        here = (*path, label(name, field.is_required()))
        section = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)  # Optional[Section] too
        if isinstance(value, dict) and section is not None:
            yield from scalar_parameters(value, section, here, f"{keys}{name}.")
        elif field.annotation in (str, int, float) or typing.get_origin(field.annotation) is typing.Literal:
            yield here, keys + name, value


# ---------------------------------------------------------------------------------------------------------------
# What the form does show: every `.schema-form-property` with its own label, description, code spans and value.

READ_FORM = """() => {
  const own = (el, sel) => [...el.querySelectorAll(sel)].find(x => x.closest('.schema-form-property') === el);
  return [...document.querySelectorAll('.schema-form-property')].map((el, index) => {
    const path = [];
    for (let p = el; p; p = p.parentElement.closest('.schema-form-property')) {
      const l = own(p, '.schema-form-property__label');
      path.unshift(l ? l.innerText.trim() : '?');
    }
    const desc = own(el, '.schema-form-property__description');
    const input = own(el, 'input:not([type=checkbox]), textarea');
    const select = own(el, '.p-select-button__value');
    return {
      index, path, visible: el.checkVisibility(),
      description: desc ? desc.innerText.trim() : null,
      code: desc ? [...desc.querySelectorAll('code')].map(c => c.innerText) : [],
      select: own(el, '.p-select-button__control') ? (select ? select.innerText.trim() : '') : null,
      value: input ? input.value : null,
    };
  });
}"""


def ui_api_url(base: str) -> str:
    """The API address the server's UI will call (its /ui-settings), which must be this server's own."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/ui-settings", timeout=10) as response:
        return json.loads(response.read())["api_url"]


def full_page_screenshot(page, tmp_path: Path) -> Path:
    """The run page scrolls inside the app's own container, so grow the viewport to the tallest scroll height."""
    height = VIEWPORT["height"]
    for _ in range(3):
        wanted = page.evaluate(
            "() => Math.max(...[...document.querySelectorAll('body, body *')].map(e => e.scrollHeight))")
        wanted = min(max(wanted, VIEWPORT["height"]), 16_000)  # Chromium's limit on one capture
        if wanted <= height:
            break
        height = wanted
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(500)
    shot = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot), full_page=True)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    print(f"\nscreenshot of the run form: {SCREENSHOT} (and {shot})")
    return shot


def rendered(page, paths: list[tuple]) -> list[dict]:
    """The form as READ_FORM reads it, once the UI has rendered the markdown description of every one of ``paths``
    (it renders them after the labels, a long form on a 2-core machine takes seconds), or as it is at the timeout."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        shown = page.evaluate(READ_FORM)
        by_path = {tuple(p["path"]): p for p in shown}
        if all(by_path.get(p, {}).get("description") for p in paths) or time.monotonic() > deadline:
            return shown
        page.wait_for_timeout(500)


def dropdown_choices(page, index: int) -> list[str]:
    """Open the dropdown of form property ``index`` as a keyboard user does, read its choices, close it.
    (A synthetic mouse click does not open Prefect's p-select in headless Chromium; focus + ArrowDown does.)"""
    control = page.locator(".schema-form-property").nth(index).locator(".p-select-button__control").first
    control.scroll_into_view_if_needed()
    control.focus()
    page.keyboard.press("ArrowDown")
    listbox = page.locator("[role=listbox]").last
    listbox.locator(".p-select-option").first.wait_for(timeout=TIMEOUT_MS)
    choices = [c.strip() for c in listbox.locator(".p-select-option").all_inner_texts()]
    page.keyboard.press("Escape")
    control.blur()
    return choices


def test_run_form_shows_config_fields_with_descriptions(chromium, on_demand, prefect_api, tmp_path):
    from playwright.sync_api import sync_playwright
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    base = prefect_api.removesuffix("/api")
    assert ui_api_url(base) == prefect_api, "the UI would call another server's API: set PREFECT_SERVER_API_PORT"
    flow_params = parameter_schema(finetune).model_dump()["properties"]
    problems: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            try:
                page.goto(f"{base}/deployments/deployment/{on_demand.id}/run", timeout=TIMEOUT_MS)
                labels = page.locator(".schema-form-property__label")
                try:  # the whole schema renders at once: the flow's last parameter appears with the config tree
                    labels.filter(has_text=re.compile(r"^run_dir\b")).first.wait_for(timeout=TIMEOUT_MS)
                    labels.filter(has_text=re.compile(r"^Experiment\b")).first.wait_for(timeout=TIMEOUT_MS)
                except Exception as exc:
                    body = page.locator("body").inner_text()[:2000]
                    pytest.fail(f"the run form did not render within {TIMEOUT_MS // 1000}s ({exc}).\n"
                                f"Page text:\n{body}\nBrowser errors:\n" + "\n".join(errors[-20:]), pytrace=False)

                shown = rendered(page, [path for path, _, _ in config_fields()])
                by_path = {tuple(p["path"]): p for p in shown}

                # Every config key, sections included, nested under its section, visible, described as in code.
                for path, key, field in config_fields():
                    prop = by_path.get(path)
                    if prop is None:
                        problems.append(f"{key}: no field {' > '.join(path)!r} in the form")
                        continue
                    if not prop["visible"]:
                        problems.append(f"{key}: field {' > '.join(path)!r} is not visible")
                    text, code = as_rendered(field.description)
                    if prop["description"] != text:
                        problems.append(f"{key}: description renders as {prop['description']!r}; "
                                        f"config.py says {field.description!r}")
                    elif prop["code"] != code:
                        problems.append(f"{key}: code spans render as {prop['code']}, expected {code}")
                    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is \
                        typing.Literal else None
                    if choices:
                        if prop["select"] is None:
                            problems.append(f"{key}: a Literal{list(choices)} but the form shows no dropdown")
                        else:
                            offered = dropdown_choices(page, prop["index"])
                            if offered != [str(c) for c in choices]:  # Literal[4, 8] is offered as 4 and 8
                                problems.append(f"{key}: dropdown offers {offered}, config.py allows {list(choices)}")

                # The flow's other parameters, described by the flow's docstring.
                for name in ("train_deployment", "run_dir"):
                    path = (label(name, False, flow_params[name]["title"]),)
                    prop = by_path.get(path)
                    if prop is None:
                        problems.append(f"parameter {name}: no field {path[0]!r} in the form")
                    elif prop["description"] != as_rendered(flow_params[name]["description"])[0]:
                        problems.append(f"parameter {name}: description renders as {prop['description']!r}")

                # The deployment's parameters fill the form.
                params = on_demand.parameters
                for path, key, value in scalar_parameters(params["config"]):
                    prop = by_path.get(path, {})
                    got = prop.get("select") if prop.get("select") is not None else prop.get("value")
                    same = got == value if isinstance(value, str) else _number(got) == value
                    if not same:
                        problems.append(f"{key}: the form shows {got!r}, the deployment's parameter is {value!r}")
                train_deployment = page.locator(".schema-form-property").nth(
                    by_path[(label("train_deployment", False, "train_deployment"),)]["index"])
                if train_deployment.locator("input, textarea").first.input_value() != params["train_deployment"]:
                    problems.append(f"train_deployment: the form does not show {params['train_deployment']!r}")

                # The examples the brief singles out, asserted the way a reader of the page sees them.
                from playwright.sync_api import expect

                for text in (TuneflowConfig.model_fields["run_name"].description,
                             "Method (Optional)", "Learning Rate (Optional)", "Lora (Optional)", "Rank (Optional)",
                             "Name Or Path", "Max Shard Size (Optional)", "train_deployment (Optional)"):
                    expect(page.get_by_text(text, exact=True).first).to_be_visible()
            finally:
                full_page_screenshot(page, tmp_path)
        finally:
            browser.close()

    assert not problems, "the Prefect run form differs from tuneflow/core/config.py:\n  " + "\n  ".join(problems)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
