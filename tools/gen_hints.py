"""Write javascript/layout_retouch.js (hover hints) from the parameter table, the one source of truth.

    .venv/bin/python tools/gen_hints.py          # rewrite
A library test fails when the committed file is out of date."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib_layout_retouch.params import FIELDS  # noqa: E402

JS_PATH = os.path.join(ROOT, "javascript", "layout_retouch.js")


def render() -> str:
    hints = {f.label: f.hint for f in FIELDS}
    for f in FIELDS:
        for label in f.choice_labels:
            hints.setdefault(label, f.hint)
    body = json.dumps(hints, indent=4, ensure_ascii=False)
    return (
        "// Hover hints for the Layout-and-Retouch controls, through the WebUI's `titles` (hints.js).\n"
        "// Generated from lib_layout_retouch/params.py by tools/gen_hints.py: do not edit by hand.\n"
        "(function () {\n"
        f"    const layoutRetouchHints = {body.replace(chr(10), chr(10) + '    ')};\n"
        "    function addHints() {\n"
        "        if (typeof titles === 'object') Object.assign(titles, layoutRetouchHints);\n"
        "    }\n"
        "    addHints();\n"
        "    if (typeof onUiLoaded === 'function') onUiLoaded(addHints);\n"
        "})();\n"
    )


if __name__ == "__main__":
    with open(JS_PATH, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {JS_PATH}")
