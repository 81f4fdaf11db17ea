"""The docs users read stay true to the code."""

from pathlib import Path

from tuneflow.core.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_in_sync():
    assert (ROOT / "docs/config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `.venv/bin/python -m tuneflow.core.reference > docs/config.md`"
    )


def test_every_preset_says_the_command_that_runs_it():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for preset in presets:
        head = preset.read_text().split("\n\n")[0]
        assert "make demo" in head or f"--config configs/{preset.name}" in head, preset


def test_every_test_the_fault_docs_name_exists():
    import re

    named = set(re.findall(r"`(tests/(?:unit|integration)/test_\w+\.py)`", (ROOT / "docs/faults.md").read_text()))
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert named and not missing, missing
