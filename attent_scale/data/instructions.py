"""Instruction pairs every machine with Python has: "write the docstring of `module.func(args)`" -> its
first docstring paragraph, read with `ast` from the standard library's own sources (nothing imported,
nothing downloaded; the same pairs for the same Python version)."""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from attent_scale.errors import UserError

PROMPT = "Write the docstring of `{name}({args})`."
# packages that are not library code (tests, demos, GUIs, vendored installers) or that third parties fill
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "dist-packages", "__pycache__", "__phello__", "pydoc_data"}
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
    """The standard library's source directory of the running interpreter (a venv's base one)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted public module name, source file) of every library module under `root`, sorted."""
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if set(parts[:-1]) & _SKIP_DIRS or parts[0].startswith("config-"):
            continue
        if parts[-1] == "__init__":
            parts.pop()
        if parts and not any(p.startswith("_") or not p.isidentifier() for p in parts):
            yield ".".join(parts), path


def _defs(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Public top-level functions and public methods of public top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, _FUNCS) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, _FUNCS) and not sub.name.startswith("_"):
                    yield f"{node.name}.{sub.name}", sub


def first_paragraph(doc: str) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _usable(response: str, max_chars: int) -> bool:
    # a sentence, not a C-style "name(args) -> result" line; printable ASCII: any tokenizer encodes it
    return (20 <= len(response) <= max_chars and response[0].isupper() and " " in response
            and response.isascii() and response.isprintable() and "->" not in response)


def docstring_pairs(root: Path | None = None, *, max_response_chars: int = 160,
                    max_signature_chars: int = 60) -> list[dict[str, str]]:
    """Every usable {"prompt", "response", "source"} pair in `root` (the standard library by default).

    Deduplicated by prompt and by response (stdlib repeats docstrings across overrides), so any split of
    the list into train and val is disjoint in both; ordered by the prompt's sha256, so a prefix of any
    length is a spread over the whole library rather than its first modules."""
    root = stdlib_dir() if root is None else Path(root)
    pairs: dict[str, dict[str, str]] = {}
    responses: set[str] = set()
    for module, path in _modules(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # an unparsable or unreadable file contributes nothing; not our data
        for name, node in _defs(tree):
            doc = ast.get_docstring(node)
            args = ast.unparse(node.args)
            if not doc or len(args) > max_signature_chars:
                continue
            response = first_paragraph(doc)
            prompt = PROMPT.format(name=f"{module}.{name}", args=args)
            if prompt in pairs or response in responses or not _usable(response, max_response_chars):
                continue
            responses.add(response)
            pairs[prompt] = {"prompt": prompt, "response": response, "source": f"{module}.{name}"}
    if not pairs:
        raise UserError(f"{root}: no documented public functions found (is the Python standard library's "
                        "source installed?)")
    return [pairs[p] for p in sorted(pairs, key=lambda p: hashlib.sha256(p.encode()).hexdigest())]


def write_instructions(path: str | Path, max_examples: int | None = None, **kwargs: int) -> int:
    """Write the first `max_examples` docstring pairs to `path` as JSONL; return how many were written."""
    pairs = docstring_pairs(**kwargs)[:max_examples]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tmp.replace(out)
    return len(pairs)
