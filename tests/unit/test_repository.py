"""Rules about the repository's own text (style.md), checked so they stay true.

* Reference documents are cited by file name: a line that cites a section
  (``§``) names ``rafs-format.md``, ``nydus-surface.md``, ``vhost-user-fs.md``
  or ``style.md`` (or an RFC), never a bare "reference §6.3".
* Tests hold no timed asserts: an ``assert`` must not compare clock readings
  (performance is measured by scripts/bench against a peer, not asserted).
* The installed package does not reach into the checkout: nothing under
  ``src/nydus_vfs`` walks up from its own file (``parents[N]``) or names the
  checkout's ``qemu/`` directory; that tooling lives in ``tests/guest.py``.
"""

from __future__ import annotations

import ast
import re

from tests.conftest import PROJECT_ROOT

_SECTION = "\u00a7"
_CITED = re.compile(r"(nydus-surface|rafs-format|vhost-user-fs|style)\.md|RFC \d+")
_TEXT_SUFFIXES = {".py", ".c", ".h", ".sh", ".md", ".toml", ".txt", ""}
_CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time"}


def _files(*roots: str, suffixes=_TEXT_SUFFIXES):
    for root in roots:
        base = PROJECT_ROOT / root
        if not base.exists():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
                yield path


def test_section_citations_name_their_document():
    bare = []
    for path in _files("src", "tests", "native", "scripts", "qemu"):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if _SECTION in line and not _CITED.search(line):
                bare.append(f"{path.relative_to(PROJECT_ROOT)}:{n}: {line.strip()}")
    assert not bare, "cite the document by name (e.g. `rafs-format.md §3.8`):\n" + "\n".join(bare)


def _is_clock_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in _CLOCKS


def _timed_asserts(tree: ast.AST) -> list[int]:
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        tainted: set[str] = set()
        changed = True
        while changed:  # names holding a clock reading, or computed from one
            changed = False
            for node in ast.walk(fn):
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = {t.id for tgt in targets for t in ast.walk(tgt) if isinstance(t, ast.Name)}
                    if names - tainted and any(_is_clock_call(v) or (isinstance(v, ast.Name) and v.id in tainted)
                                               for v in ast.walk(node.value)):
                        tainted |= names
                        changed = True
        for node in ast.walk(fn):
            if isinstance(node, ast.Assert) and any(
                    _is_clock_call(v) or (isinstance(v, ast.Name) and v.id in tainted) for v in ast.walk(node.test)):
                found.append(node.lineno)
    return sorted(set(found))


def test_tests_hold_no_timed_asserts():
    offenders = []
    for path in _files("tests", suffixes={".py"}):
        if path.parts[len(PROJECT_ROOT.parts)] == "tests" and "harness" in path.parts:
            continue  # the front-end harness is tooling (deadlines), not tests
        for line in _timed_asserts(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{line}")
    assert not offenders, "timed asserts belong in scripts/bench:\n" + "\n".join(offenders)


def test_timed_assert_detector_sees_what_it_must():
    src = ("def t():\n    t0 = time.perf_counter()\n    work()\n    elapsed = time.perf_counter() - t0\n"
           "    assert elapsed < 0.5\n    assert time.monotonic() - t0 < 3\n    assert len(work()) == 2\n")
    assert _timed_asserts(ast.parse(src)) == [5, 6]


def _ups(line: str) -> int:
    """How many directories ``Path(__file__)...`` climbs on this line (0 if it does not)."""
    if "__file__" not in line:
        return 0
    ups = len(re.findall(r"\.parent\b(?!s)", line))
    ups += sum(int(n) + 1 for n in re.findall(r"\.parents\[(\d+)\]", line))
    return ups


def test_the_installed_package_does_not_reach_into_the_checkout():
    offenders = []
    src = PROJECT_ROOT / "src"
    for path in _files("src/nydus_vfs", suffixes={".py"}):
        # Climbing to src/ (site-packages once installed) is fine; one more is the checkout.
        depth = len(path.relative_to(src).parts)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _ups(line) > depth or re.search(r"[\"']qemu[/\"']", line):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{n}: {line.strip()}")
    assert not offenders, "checkout-only tooling belongs under tests/ or qemu/:\n" + "\n".join(offenders)
    assert not (src / "nydus_vfs/testing/guest.py").exists()
    assert (PROJECT_ROOT / "tests/guest.py").is_file()


def test_climb_counter():
    assert _ups("ROOT = pathlib.Path(__file__).resolve().parents[3]") == 4
    assert _ups("P = str(Path(__file__).resolve().parent.parent.parent) + os.sep") == 3
    assert _ups("x.parent.parent") == 0
