"""docs/config.md, the reference of every config key, generated from the config tree:

    python -m tuneflow.core.reference > docs/config.md        # tests/unit/test_docs.py keeps it in sync
"""

from __future__ import annotations

import json
from typing import get_args, get_origin

from pydantic import BaseModel

from tuneflow.core.config import TuneflowConfig


def reference_markdown() -> str:
    """docs/config.md: every key with its default and description
    (`python -m tuneflow.core.reference > docs/config.md`)."""
    lines = [
        "# Config reference",
        "",
        "Generated from `tuneflow/core/config.py` by `python -m tuneflow.core.reference > docs/config.md`; "
        "a test keeps it in sync.",
        "",
        "| key | default | description |",
        "|---|---|---|",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + name
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            item = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
            optional = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            default = "required" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
            bounds = [f"{label} {getattr(m, attr)}" for m in field.metadata
                      for attr, label in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if hasattr(m, attr)]
            extra = f" ({', '.join(bounds)})" if bounds else ""
            lines.append(f"| `{key}` | `{default}` | {field.description}{extra} |")
            if isinstance(item, type) and issubclass(item, BaseModel):
                walk(item, key + "[].")  # the fields of each entry
            elif optional is not None:
                walk(optional, key + ".")  # a section that is off unless set, e.g. eval.judge

    walk(TuneflowConfig, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
