"""README's examples, run for real against swapper on the shipped models.yaml.

Which blocks run (README conventions this test relies on):

* Every fenced block inside the section whose heading starts with "Try it" (``## Try it``, any
  level from 2 to 4; the section ends at the next heading of the same or a higher level):
  - ```` ```bash ```` (or ``sh``, ``shell``, ``console``) blocks that contain ``curl``;
  - ```` ```python ```` (or ``py``) blocks.
  Other blocks there (``yaml``, ``text``, a bash block without curl) are shown, not run.
* Anywhere else, a block runs if the line just before its fence is ``<!-- readme-test -->``; and
  ``<!-- readme-test: skip -->`` there keeps a Try-it block from running.

How a block runs: with cwd = the repository root (so ``.demo/models/test.wav`` resolves), against
a swapper started here with the shipped ``models.yaml`` on a free port (its ``startPort`` moved to
free ports as well). Every ``127.0.0.1:8080`` / ``localhost:8080`` in the block is replaced by that
port. Bash blocks run under ``bash -e -o pipefail`` with ``curl`` wrapped as
``curl --fail-with-body -sS``, so an HTTP error fails the test; leading ``$ `` prompts are
stripped. Python blocks run in a fresh interpreter (the venv's, with openai and anthropic). A block
passes when it exits 0 within ``BLOCK_TIMEOUT``. Blocks run in README order on one swapper and
must not depend on each other's state; they must not start swapper themselves.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.realstack import ROOT, SwapperProcess, demo_missing, derived_config, running_swapper

README = ROOT / "README.md"
BLOCK_TIMEOUT = 120.0  # a plain whisper transcription of the test WAV takes 5-13 s on 2 busy cores
SECTION = re.compile(r"^try it\b", re.IGNORECASE)
MARK_RUN = "<!-- readme-test -->"
MARK_SKIP = "<!-- readme-test: skip -->"
SHELLS = frozenset({"bash", "sh", "shell", "console"})
PYTHONS = frozenset({"python", "py", "python3"})
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)")
PORT = re.compile(r"\b(?:127\.0\.0\.1|localhost):8080\b")
CURL_WRAPPER = 'curl() { command curl --fail-with-body -sS "$@"; }\n'


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str  # "bash" or "python"
    code: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def extract_blocks(text: str) -> list[Block]:
    """The runnable blocks of a README, in order (see the module docstring for the rules)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section_level: int | None = None  # level of the open "Try it" heading, if inside one
    prev = ""  # last non-blank line before the current one, outside fences
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            heading = HEADING.match(line)
            if heading:
                level = len(heading.group(1))
                if section_level is not None and level <= section_level:
                    section_level = None
                if 2 <= level <= 4 and SECTION.match(heading.group(2)):
                    section_level = level
            if line.strip():
                prev = line.strip()
            i += 1
            continue
        marker, lang = fence.group(1), fence.group(2).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        code = "\n".join(body) + "\n"
        wanted = (section_level is not None and prev != MARK_SKIP) or prev == MARK_RUN
        prev = ""
        if not wanted:
            continue
        if lang in SHELLS and "curl" in code:
            blocks.append(Block(start + 1, "bash", code))
        elif lang in PYTHONS:
            blocks.append(Block(start + 1, "python", code))
    return blocks


def _readme_blocks() -> list[Block]:
    try:
        return extract_blocks(README.read_text())
    except OSError:
        return []


BLOCKS = _readme_blocks()
MISSING = demo_missing()
needs_demo = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def readme_swapper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwapperProcess]:
    workdir = tmp_path_factory.mktemp("readme")
    config = derived_config(workdir / "models.yaml")
    with running_swapper(config, workdir / "swapper.log") as stack:
        yield stack


@pytest.fixture
def swapper_for_block(readme_swapper: SwapperProcess) -> Iterator[SwapperProcess]:
    yield readme_swapper
    readme_swapper.unload()  # no child outlives the test (conftest's leak check)


def test_readme_has_runnable_examples() -> None:
    assert README.is_file(), f"{README} is missing"
    assert BLOCKS, (
        "README.md has no runnable examples: put ```bash blocks with curl and ```python blocks under "
        "a '## Try it' heading (or mark a block with <!-- readme-test --> on the line before its fence)"
    )
    langs = {b.lang for b in BLOCKS}
    assert langs == {"bash", "python"}, f"README's Try-it section should show both curl and Python: {langs}"


def prepare(block: Block, port: int) -> list[str]:
    code = PORT.sub(f"127.0.0.1:{port}", block.code)
    if block.lang == "python":
        return [sys.executable, "-c", code]
    script = "\n".join(line[2:] if line.startswith("$ ") else line for line in code.splitlines())
    return ["bash", "-e", "-o", "pipefail", "-c", CURL_WRAPPER + script]


@needs_demo
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_example(block: Block, swapper_for_block: SwapperProcess) -> None:
    argv = prepare(block, swapper_for_block.port)
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = b"".join(x if isinstance(x, bytes) else x.encode() for x in (exc.stdout, exc.stderr) if x)
        pytest.fail(f"{block.id} ran over {BLOCK_TIMEOUT}s:\n{block.code}\n{out.decode(errors='replace')}")
    assert done.returncode == 0, (
        f"{block.id} exited {done.returncode}\n--- block ---\n{block.code}--- stdout ---\n{done.stdout}"
        f"--- stderr ---\n{done.stderr}--- swapper ---\n{swapper_for_block.log_tail(15)}"
    )


# ---- the extractor itself ----------------------------------------------------------------------

SAMPLE = """\
# swapper

```bash
swapper --config models.yaml
```

## Try it

Some text.

```bash
curl http://127.0.0.1:8080/v1/models
```

```bash
.venv/bin/swapper --config models.yaml   # shown, not run
```

```yaml
models: {}
```

<!-- readme-test: skip -->
```bash
curl http://127.0.0.1:8080/v1/slow
```

### From Python

```python
print("hi")
```

## Configuration

```python
print("not run")
```

<!-- readme-test -->
```sh
$ curl localhost:8080/running
```
"""


def test_extract_blocks_follows_the_conventions() -> None:
    blocks = extract_blocks(SAMPLE)
    assert [(b.line, b.lang) for b in blocks] == [(11, "bash"), (30, "python"), (41, "bash")]
    assert blocks[0].code == "curl http://127.0.0.1:8080/v1/models\n"
    argv = prepare(blocks[2], 1234)
    assert argv[-1].endswith("curl 127.0.0.1:1234/running")
