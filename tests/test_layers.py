"""Imports only point down: quant <- runtime <- export <- bench, and the runtime never touches torch.

Every import statement is read from the source (AST, function-level imports included), so a lazy upward
import is caught as well as a top-level one. The CLI reaches export/ and bench/ subcommands by module name
(runtime/cli.py ``PLUGGED``), not by import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = {"quant": {"quant"}, "runtime": {"runtime", "quant"}, "export": {"export", "runtime", "quant"},
          "bench": {"bench", "export", "runtime", "quant"}}
# The export side's heavy packages (the [export] extra): never in the lean runtime or in quant.
EXPORT_ONLY = {"torch", "transformers", "qwen_tts", "librosa", "onnx", "onnxscript", "huggingface_hub"}


def _imports(path: Path, package: list[str]) -> list[tuple[int, str]]:
    """(line, target) for every import: our layer name for project imports, else the top-level package.

    Relative imports resolve against the file's own ``package`` (its layer plus sub-folders, e.g. runtime/voices).
    """
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                names = [".".join(["qwen3_tts_edge", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            out.append((node.lineno, parts[1] if parts[0] == "qwen3_tts_edge" and len(parts) > 1 else parts[0]))
    return out


def _modules():
    return [(layer, path) for layer in LAYERS for path in sorted((REPO / layer).rglob("*.py"))]


@pytest.mark.parametrize("layer,path", _modules(), ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path)
                         else v)
def test_imports_point_down(layer, path):
    wrong = []
    for line, target in _imports(path, list(path.relative_to(REPO).parent.parts)):
        if target in LAYERS and target not in LAYERS[layer]:
            wrong.append(f"line {line}: {layer}/ imports {target}/")
        if layer in ("runtime", "quant") and target in EXPORT_ONLY:
            wrong.append(f"line {line}: {layer}/ imports {target} (export-only)")
    assert not wrong, f"{path.relative_to(REPO)}: " + "; ".join(wrong)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from ..bench import run\n\ndef f():\n    import torch\n    from .x import y\n")
    assert _imports(src, ["runtime"]) == [(1, "bench"), (4, "torch"), (5, "runtime")]
    # One folder down (runtime/voices), ``..`` is still the runtime and ``...`` the project's top.
    src.write_text("from ..errors import E\nfrom ...bench import run\n")
    assert _imports(src, ["runtime", "voices"]) == [(1, "runtime"), (2, "bench")]
