"""What ``import personalign`` costs and gives: its public names, and no heavy backend loaded.

The core SDK imports without torch, transformers, datasets, matplotlib or the server stack; those
load when first used (STYLE 11), and matplotlib, scipy and scikit-learn are the ``lab`` extra.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "datasets", "matplotlib", "scipy", "sklearn", "chromadb", "fastapi", "uvicorn")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_heavy_backend():
    assert _imported_after("import personalign") == []


def test_the_trl_and_datasets_helpers_are_top_level_names():
    import personalign
    from personalign import types

    for name in ("to_dataset", "from_dataset", "comparison_from_row", "read_preferences", "write_preferences"):
        assert getattr(personalign, name) is getattr(types, name) and name in personalign.__all__
    assert _imported_after("from personalign import to_dataset, from_dataset, comparison_from_row") == []
