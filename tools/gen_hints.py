"""Write javascript/layout_retouch.js (hover hints) from the parameter table, the one source of truth.

    .venv/bin/python tools/gen_hints.py          # rewrite
A library test fails when the committed file is out of date."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS  # noqa: E402
from lib_layout_retouch.ui_text import ACCORDION_LABEL, EXTRA_HINTS  # noqa: E402

JS_PATH = os.path.join(ROOT, "javascript", "layout_retouch.js")


def render() -> str:
    hints = {f.label: f.hint for f in FIELDS}
    for f in FIELDS:
        for label in f.choice_labels:
            hints.setdefault(label, f.hint)
    hints.update(EXTRA_HINTS)
    hints.setdefault(ACCORDION_LABEL, FIELD_BY_NAME["enabled"].hint)  # Enable is the accordion's header
    body = json.dumps(hints, indent=4, ensure_ascii=False)
    return (
        "// Hover hints for the Layout-and-Retouch controls, through the WebUI's `titles` (hints.js).\n"
        "// Generated from lib_layout_retouch/params.py by tools/gen_hints.py: do not edit by hand.\n"
        "(function () {\n"
        f"    const layoutRetouchHints = {body.replace(chr(10), chr(10) + '    ')};\n"
        "    function addHints() {\n"
        "        if (typeof titles === 'object') Object.assign(titles, layoutRetouchHints);\n"
        "    }\n"
        "    // The WebUI's hints.js looks at span/button/p only: block labels (the photo's) and the\n"
        "    // accordion headers get their title here.\n"
        "    function labelTitles() {\n"
        "        const root = (typeof gradioApp === 'function') ? gradioApp() : document;\n"
        "        root.querySelectorAll('#tab_txt2img label, #tab_txt2img [data-testid=\"block-label\"], #tab_txt2img .label-wrap, #tab_txt2img .label-wrap span, #tab_txt2img button').forEach(function (el) {\n"
        "            if (el.title) return;\n"
        "            const hint = layoutRetouchHints[(el.textContent || '').trim()];\n"
        "            if (!hint) return;\n"
        "            el.title = hint;\n"
        "            // an image's label floats over its drop zone: the whole block gets the hint\n"
        "            if (el.dataset.testid === 'block-label' && el.parentElement && !el.parentElement.title) el.parentElement.title = hint;\n"
        "        });\n"
        "    }\n"
        "    addHints();\n"
        "    if (typeof onUiLoaded === 'function') onUiLoaded(function () { addHints(); labelTitles(); });\n"
        "    if (typeof onUiUpdate === 'function') {\n"
        "        let pending = null;\n"
        "        onUiUpdate(function () {\n"
        "            if (pending) return;\n"
        "            pending = setTimeout(function () { pending = null; labelTitles(); }, 500);\n"
        "        });\n"
        "    }\n"
        "})();\n"
    )


if __name__ == "__main__":
    with open(JS_PATH, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {JS_PATH}")
