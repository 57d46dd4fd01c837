"""Docs that run: every complete program in README.md and docs/ is executed, and the output the page shows is checked.

The conventions the pages follow (``test_conventions`` holds them to it):

- A **complete program** is a ```` ```python ```` block that defines ``async def main`` and calls
  ``anyio.run(main`` on a line of its own at top level (column 0). Every other block is a fragment, and is not run.
- Its **shown output** is the next fenced block, if it is a ```` ```text ```` block and the one paragraph between
  the two starts with "Output" or "It prints" and ends with ":" ("Output:", "Output (`...` is a lease id):"). A
  block introduced that way must follow a complete program: no shown output goes unchecked.
- In a shown output, ``...`` stands for any text within one line (a lease id, a worker that varies). Everything
  else must match exactly, line for line (trailing spaces aside), so a shown error message is checked too.
- Blocks titled with a file name (```` ```python title="app.py" ````) are files of one project per page, written
  side by side; when one is a test module (``test_*.py``), pytest runs them and every test in them must pass.

How they run: each program in a fresh interpreter, as a reader would run it, with ``anyio.run`` replaced by one
that runs it on virtual time unless the program chose its own clock (``backend_options``, as the scheduler's
programs do with trio's ``MockClock``): on asyncio, ``anyio.run``'s default, whose FIFO scheduling makes
concurrent tasks print in the order a reader sees, but on a loop whose clock jumps to the next timer whenever
nothing is ready. Sleeps and TTLs then take no real time, and a program prints the same times on every run. A
program that builds an ``EtcdBackend`` runs on asyncio in real time against the suite's etcd server, whose
endpoint replaces ``http://127.0.0.1:2379`` in its source.
"""

from __future__ import annotations

import difflib
import io
import itertools
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordkit.testing import EtcdServer

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"

# Runs the program at argv[1] with anyio.run on virtual time (see the module docstring).
VIRTUAL_TIME = """
import asyncio, runpy, selectors, sys
import anyio


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        self.now = 0.0
        super().__init__(selector=JumpingSelector(self))

    def time(self):
        return self.now


class JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop):
        super().__init__()
        self.loop = loop

    def select(self, timeout=None):
        # Nothing is ready and the next timer is `timeout` away: look without waiting, then jump there.
        events = super().select(None if timeout is None else 0)
        if not events and timeout:
            self.loop.now += timeout
        return events


real_run = anyio.run


def run(func, *args, backend="asyncio", backend_options=None):
    if backend_options is None:
        backend, backend_options = "asyncio", {"loop_factory": VirtualTimeLoop}
    return real_run(func, *args, backend=backend, backend_options=backend_options)


anyio.run = run
runpy.run_path(sys.argv[1], run_name="__main__")
"""

TITLE = re.compile(r'\btitle="(?P<name>[\w.]+)"')
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)(?P<attrs>.*)$")
OUTPUT_INTRO = re.compile(r"^(Output|It prints)\b.*:$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    attrs: str  # what follows the language on the fence line, e.g. title="app.py"
    text: str
    intro: str  # the paragraph just before the block, joined into one line

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Program:
    block: Block
    output: Block | None


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found: list[Block] = []
    paragraph: list[str] = []  # the last paragraph of prose seen
    ended = True  # whether a blank line ended it
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            line = lines[i].strip()
            if line:
                paragraph = [line] if ended else [*paragraph, line]
            ended = not line
            i += 1
            continue
        indent = len(fence["indent"])
        end = i + 1
        while lines[end].strip() != "```":
            end += 1
        body = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        found.append(Block(page, i + 1, fence["lang"], fence["attrs"].strip(), body, " ".join(paragraph)))
        paragraph, ended = [], True
        i = end + 1
    return found


def is_program(block: Block) -> bool:
    return (
        block.lang == "python"
        and re.search(r"^async def main\(", block.text, re.MULTILINE) is not None
        and re.search(r"^anyio\.run\(main\b", block.text, re.MULTILINE) is not None
    )


def needs_etcd(source: str) -> bool:
    """Whether the program builds an EtcdBackend (in its code: a comment naming one does not count)."""
    names = [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)]
    return any(name == "EtcdBackend" and following == "(" for name, following in itertools.pairwise(names))


def shows_output(block: Block) -> bool:
    return block.lang == "text" and OUTPUT_INTRO.match(block.intro) is not None


def programs() -> list[Program]:
    found: list[Program] = []
    for page in PAGES:
        page_blocks = blocks(page)
        for i, block in enumerate(page_blocks):
            if is_program(block):
                following = page_blocks[i + 1] if i + 1 < len(page_blocks) else None
                output = following if following is not None and shows_output(following) else None
                found.append(Program(block, output))
    return found


PROGRAMS = programs()


def matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` is ``expected``, line for line, where ``...`` in ``expected`` is any text in one line."""
    want, got = expected.rstrip("\n").split("\n"), actual.rstrip("\n").split("\n")
    if len(want) != len(got):
        return False
    for pattern, line in zip(want, got, strict=True):
        regex = ".*?".join(re.escape(part) for part in pattern.rstrip().split("..."))
        if re.fullmatch(regex, line.rstrip()) is None:
            return False
    return True


def test_conventions() -> None:
    """Every shown output belongs to a program; no fragment looks like a program; the programs are all found."""
    for page in PAGES:
        page_blocks = blocks(page)
        for previous, block in zip([None, *page_blocks], page_blocks, strict=False):
            if shows_output(block):
                assert previous is not None and is_program(previous), f"{block.where}: output of no program"
            if block.lang == "python" and not is_program(block):
                # A block that runs something at top level but is not a program would silently go unchecked.
                assert re.search(r"^anyio\.run\(main\b", block.text, re.MULTILINE) is None, block.where
    # A change of the conventions that loses programs or their outputs fails here.
    assert len(PROGRAMS) >= 25
    assert len([program for program in PROGRAMS if program.output is not None]) >= 23


def test_matches() -> None:
    """The comparison is strict except for ``...`` within a line."""
    assert matches("lease 1f...a (ttl 10)\nok\n", "lease 1f0a3a (ttl 10)\nok")
    assert not matches("lease ... (ttl 10)\n", "lease 1f (ttl 11)\n")
    assert not matches("a\nb\n", "a\n")
    assert not matches("a ...\n", "a b\nc\n")  # "..." never spans lines
    assert not matches("error: session lost\n", "error: session lost!\n")


def env() -> dict[str, str]:
    """The environment of a program: this checkout's coordkit first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(source: str, tmp_path: Path, etcd: EtcdServer | None = None) -> str:
    """Run a program as a reader would (see the module docstring) and return what it printed."""
    script = tmp_path / "program.py"
    if needs_etcd(source):
        assert etcd is not None
        script.write_text(source.replace(DEFAULT_ENDPOINT, etcd.endpoint))
        args = [sys.executable, str(script)]
    else:
        script.write_text(source)
        args = [sys.executable, "-c", VIRTUAL_TIME, str(script)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def check_output(program: Program, printed: str) -> None:
    assert program.output is not None
    diff = difflib.unified_diff(
        program.output.text.splitlines(), printed.splitlines(), program.output.where, "printed", lineterm=""
    )
    assert matches(program.output.text, printed), f"{program.block.where}:\n" + "\n".join(diff)


@pytest.mark.parametrize("program", PROGRAMS, ids=[program.block.where for program in PROGRAMS])
def test_program(program: Program, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source = program.block.text
    etcd: EtcdServer | None = request.getfixturevalue("etcd_server") if needs_etcd(source) else None
    printed = run(source, tmp_path, etcd)
    if program.output is not None:
        check_output(program, printed)


def test_quickstart_on_etcd(tmp_path: Path) -> None:
    """The quickstart's promise: with an EtcdBackend instead "nothing else changes", and on a fresh etcd "it prints
    the same lines", the watch's perhaps in another place among the others."""
    (program,) = [program for program in PROGRAMS if program.block.page.name == "quickstart.md"]
    source = program.block.text
    assert source.count("MemoryBackend()") == 1 and source.count(" MemoryBackend,") == 1
    source = source.replace("MemoryBackend()", f'EtcdBackend(["{DEFAULT_ENDPOINT}"])')
    source = source.replace(" MemoryBackend,", " EtcdBackend,")
    assert needs_etcd(source)
    with EtcdServer() as fresh:
        printed = run(source, tmp_path, fresh)
    assert program.output is not None
    # "The watch's lines may come a little earlier or later among the others": each task's lines, in order, are
    # the ones shown.
    for task_lines in (is_watch_line, lambda line: not is_watch_line(line)):
        shown = [line for line in program.output.text.splitlines() if task_lines(line)]
        assert [line for line in printed.splitlines() if task_lines(line)] == shown, printed


def is_watch_line(line: str) -> bool:
    return line.startswith(("snapshot ", "PUT ", "DELETE "))


def titled_files() -> dict[Path, dict[str, str]]:
    """The files that pages show under a title, by page."""
    found: dict[Path, dict[str, str]] = {}
    for page in PAGES:
        for block in blocks(page):
            title = TITLE.search(block.attrs)
            if title is not None:
                files = found.setdefault(page, {})
                assert title["name"] not in files, f"{block.where}: {title['name']} shown twice"
                files[title["name"]] = block.text
    return found


TITLED = {page: files for page, files in titled_files().items() if any(name.startswith("test_") for name in files)}


def test_titled_files_are_found() -> None:
    """The pages with titled test modules are the ones expected (a lost title or page fails here)."""
    assert [page.name for page in TITLED] == ["testing.md"]


@pytest.mark.parametrize("page", list(TITLED), ids=[str(page.relative_to(ROOT)) for page in TITLED])
def test_titled_tests_pass(page: Path, tmp_path: Path) -> None:
    """A page's test modules pass, with the files they import from the same page."""
    files = TITLED[page]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    tests = sum(len(re.findall(r"^(?:async )?def test_", text, re.MULTILINE)) for text in files.values())
    # With anyio's plugin only, as the page says (it comes with anyio): other plugins cost time and change nothing.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "anyio.pytest_plugin", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={**env(), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^{tests} passed in ", done.stdout, re.MULTILINE), done.stdout
