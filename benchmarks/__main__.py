"""python -m benchmarks                  list the benchmarks (name and what it measures)
python -m benchmarks NAME [ARGS...]    run one, exactly as ``python benchmarks/<its script>.py ARGS...`` would
python -m benchmarks NAME --help       its own options

NAME is the script's name without ``bench_`` and ``.py``, with ``-`` or ``_``: ``decode``, ``real-width``,
``real_width``. Results go to benchmarks/results/ with a "run" record (commit, command, machine): README.md there.
"""

from __future__ import annotations

import ast
import difflib
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__.py", "__main__.py", "common.py"}


def _name(stem: str) -> str:
    return stem.removeprefix("bench_").replace("_", "-")


def _is_script(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    return "__name__ == \"__main__\"" in text or "__name__ == '__main__'" in text


def scripts() -> dict[str, Path]:
    """name -> script: every benchmarks/*.py that runs as a script (has a ``__main__`` block), but common.py."""
    found = {_name(p.stem): p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and _is_script(p)}
    return dict(sorted(found.items()))


def summary(path: Path, width: int = 104) -> str:
    """The first sentence of the script's module docstring (read with ast: nothing is imported)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    para = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    end = para.find(". ")
    line = para[: end + 1] if end >= 0 else para
    return line if len(line) <= width else line[: width - 3].rsplit(" ", 1)[0] + " ..."


def resolve(arg: str, found: dict[str, Path]) -> str | None:
    key = _name(Path(arg).name.removesuffix(".py").lower().replace("bench-", "bench_", 1))
    return key if key in found else None


def listing(found: dict[str, Path]) -> str:
    width = max(len(n) for n in found)
    lines = ["usage: python -m benchmarks NAME [ARGS...]   (NAME --help: its options; benchmarks/README.md)", ""]
    lines += [f"  {n:<{width}}  {summary(p)}" for n, p in found.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    found = scripts()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(listing(found))
        return 0
    name = resolve(argv[0], found)
    if name is None:
        close = difflib.get_close_matches(_name(argv[0]), list(found), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        print(f"benchmarks: no benchmark named {argv[0]!r}{hint}; one of: {', '.join(found)}", file=sys.stderr)
        return 2
    script = found[name]
    # As `python benchmarks/<script>.py ARGS` runs it: its folder first on sys.path (the scripts import common),
    # argv[0] its path (argparse's prog, the workers some scripts start with their own __file__).
    sys.path.insert(0, str(HERE))
    sys.argv = [str(script), *argv[1:]]
    import common  # the same module the script imports

    common.mark_start()
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
