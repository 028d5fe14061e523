"""What ``import personalign`` costs and gives: its public names, and no heavy backend loaded.

The core SDK imports without torch, transformers, datasets, matplotlib or the server stack; those
load when first used (STYLE 11), and matplotlib, scipy and scikit-learn are the ``lab`` extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest

HEAVY = (
    "torch",
    "transformers",
    "datasets",
    "matplotlib",
    "scipy",
    "sklearn",
    "chromadb",
    "fastapi",
    "uvicorn",
)


def _imported_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_heavy_backend():
    assert _imported_after("import personalign") == []


def test_the_trl_and_datasets_helpers_are_top_level_names():
    import personalign
    from personalign import types

    for name in (
        "to_dataset",
        "from_dataset",
        "comparison_from_row",
        "read_preferences",
        "write_preferences",
    ):
        assert getattr(personalign, name) is getattr(types, name) and name in personalign.__all__
    assert _imported_after("from personalign import to_dataset, from_dataset, comparison_from_row") == []


# What `pip install personalign` lacks: the serve, lab-only and embedded extras and the dev tools.
NOT_IN_CORE = ("fastapi", "starlette", "prometheus_client", "matplotlib", "gguf", "datasets", "trl")

_CORE_RUN = """
import json
from personalign import Comparison, Personalizer

with Personalizer.load(model={model!r}, device="cpu", store={store!r}) as pz:
    pz.enroll("alice", [Comparison(prompt="How do I boil an egg?", chosen="Nine minutes.", rejected="It depends.")])
    pz.remember("alice", "I am vegetarian.")
    found = pz.search_memories("alice", "What do I eat?")["results"]
    reply = pz.chat("alice", [{{"role": "user", "content": "Plan my dinner."}}], max_new_tokens=4)
    print(json.dumps({{"comparisons": len(pz.profile("alice").comparisons), "found": [r["memory"] for r in found], "reply": isinstance(reply, str)}}))
"""


def _core_venv(root: Path) -> Path:
    """A virtual environment holding this one's packages less the distributions in NOT_IN_CORE
    (their modules and metadata), linked rather than copied; its python."""
    site = Path(sysconfig.get_paths()["purelib"])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    skipped = set()
    for dist in distributions():
        name = dist.metadata["Name"].lower().replace("-", "_")
        if name in NOT_IN_CORE:
            skipped |= {Path(str(f)).parts[0] for f in dist.files or ()}
    assert {"fastapi", "matplotlib", "gguf"} <= skipped, (
        "the extras' packages should be installed here (the dev extra)"
    )
    for entry in site.iterdir():
        if entry.name not in skipped and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    return python


def test_the_core_sdk_enrolls_and_remembers_without_any_extra(tiny_model_dir, tmp_path):
    """``pip install personalign`` alone: in an environment without the extras' packages,
    enroll, remember, search and chat work (a local model, as without the embedded extra)."""
    python = _core_venv(tmp_path / "venv")
    missing = subprocess.run(
        [
            str(python),
            "-c",
            f"import importlib.util as u; print([m for m in {NOT_IN_CORE!r} if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert missing.stdout.strip() == "[]"
    code = _CORE_RUN.format(model=str(tiny_model_dir), store=str(tmp_path / "store"))
    result = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "comparisons": 1,
        "found": ["I am vegetarian."],
        "reply": True,
    }


def test_the_extras_declare_what_their_commands_import():
    """Each extra names the packages its modules import; dev installs every extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())[
        "project"
    ]
    names = {key: {_name(r) for r in reqs} for key, reqs in project["optional-dependencies"].items()}
    core = {_name(r) for r in project["dependencies"]}
    assert {"fastapi", "starlette", "uvicorn", "prometheus-client"} <= names["serve"]
    assert {"matplotlib", "scipy", "scikit-learn", "httpx"} <= names["lab"]
    assert "gguf" in names["embedded"] and "datasets" in names["datasets"]
    assert not (names["serve"] | names["lab"] | names["embedded"] | names["datasets"]) & core
    assert "personalign[serve,lab,embedded,datasets]" in project["optional-dependencies"]["dev"]
    assert {"accelerate", "tqdm", "chromadb", "torch", "transformers", "peft", "huggingface-hub"} <= core


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_import_of_the_package_is_declared():
    """Each third-party module ``src/personalign`` imports belongs to a distribution that
    pyproject declares, in the core dependencies or an extra (dev's test tools do not count)."""
    import ast
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {
        _name(r) for key, reqs in project["optional-dependencies"].items() if key != "dev" for r in reqs
    }
    imported: dict[str, str] = {}
    for path in (root / "src" / "personalign").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for name in names:
                imported.setdefault(name.split(".")[0], str(path.relative_to(root)))
    owners = packages_distributions()
    missing = {}
    for module, where in imported.items():
        if module in sys.stdlib_module_names or module == "personalign":
            continue
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared:
            missing[module] = where
    assert missing == {}, f"imported but not declared in pyproject: {missing}"
