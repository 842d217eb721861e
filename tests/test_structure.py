"""The package's import structure: no import cycles, and the vLLM plugin imports only what it needs.

Read from the source (every `import`, at module level or inside a function), so a lazy import that
closes a cycle counts as much as a top-level one.
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def nanoalign_imports() -> dict[str, set[str]]:
    """module name -> the nanoalign modules it imports, for nanoalign/*.py and train.py."""
    files = {f"nanoalign.{p.stem}": p for p in (ROOT / "nanoalign").glob("*.py") if p.stem != "__init__"}
    files["train"] = ROOT / "train.py"
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanoalign"):
                if node.module == "nanoalign":  # from nanoalign import grpo, rl
                    found |= {f"nanoalign.{alias.name}" for alias in node.names}
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("nanoalign.")}
        graph[name] = found & set(files)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


# The rollout backends (nanoalign/rollout.py's interface): each file holds one.
BACKENDS = ("nanoalign.rollout", "nanoalign.vllm_server", "nanoalign.vllm_colocate")


def test_the_graph_sees_known_imports():
    graph = nanoalign_imports()
    assert "nanoalign.rl" in graph["nanoalign.grpo"] and "nanoalign.rollout" in graph["nanoalign.vllm_server"]
    assert "nanoalign.vllm_server" in graph["train"]


def test_no_import_cycles():
    graph = nanoalign_imports()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_rl_modules_share_rl_not_grpo():
    graph = nanoalign_imports()
    for module in ("nanoalign.rloo", "nanoalign.online_dpo"):
        assert "nanoalign.grpo" not in graph[module], module
        assert "nanoalign.rl" in graph[module], module


def test_backends_import_the_rollout_interface_and_no_other_backend():
    # A backend is read (and forked) alone: what two backends share lives beside Rollout, in rollout.py.
    graph = nanoalign_imports()
    for backend in BACKENDS[1:]:  # rollout.py itself holds the interface and the in-process backend
        assert "nanoalign.rollout" in graph[backend], backend
    for backend in BACKENDS:
        others = set(BACKENDS[1:]) - {backend}
        assert not others & reachable(graph, backend), (backend, others & reachable(graph, backend))
    assert "nanoalign.rewards" not in reachable(graph, "nanoalign.rollout")  # rollouts are scored elsewhere (rl.py)


def test_vllm_plugin_imports_only_the_shared_transfer_code():
    # vllm_engine.py runs inside vLLM's worker processes: no rewards (math-verify, sympy), no models.
    assert reachable(nanoalign_imports(), "nanoalign.vllm_engine") == {"nanoalign.transfer"}


def test_the_repository_cites_only_its_own_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    missing = []
    for name in tracked:
        if not name.endswith((".py", ".md", ".sh", ".toml")) or not (REPO / name).exists():
            continue
        text = (REPO / name).read_text()
        assert "REFERENCE" + ".md" not in text and "../" + "shared" not in text, name  # split: this file would match
        for cited in re.findall(r"\b((?:nanoalign|bench|tests|\.ci)/[\w/.-]*\w\.(?:py|md|sh|json))\b", text):
            if not (REPO / cited).exists() and not cited.startswith("bench/results/"):  # results: written by a run
                missing.append(f"{name} cites {cited}")
    assert not missing, missing
