"""The package's import structure: no import cycles, and the vLLM plugin imports only what it needs.

Read from the source (every `import`, at module level or inside a function), so a lazy import that
closes a cycle counts as much as a top-level one.
"""

import ast
from pathlib import Path

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


def test_the_graph_sees_known_imports():
    graph = nanoalign_imports()
    assert "nanoalign.rl" in graph["nanoalign.grpo"] and "nanoalign.rollout" in graph["nanoalign.vllm_client"]
    assert "nanoalign.vllm_client" in graph["train"]


def test_no_import_cycles():
    graph = nanoalign_imports()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_rl_modules_share_rl_not_grpo():
    graph = nanoalign_imports()
    for module in ("nanoalign.rloo", "nanoalign.online_dpo"):
        assert "nanoalign.grpo" not in graph[module], module
        assert "nanoalign.rl" in graph[module], module


def test_vllm_plugin_imports_only_the_shared_transfer_code():
    # vllm_engine.py runs inside vLLM's worker processes: no rewards (math-verify, sympy), no models.
    assert reachable(nanoalign_imports(), "nanoalign.vllm_engine") == {"nanoalign.transfer"}
