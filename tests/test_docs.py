"""Run the ```python blocks of every ``docs/*.md`` page, so the documentation cannot rot.

Each page is one test case. Its python blocks run in order in one fresh namespace, inside a
temporary working directory so pages may write files. A block whose first line is
``# doctest: skip`` is not run; a page containing ``<!-- slow -->`` is marked ``slow``.
Failures name the page, the block number and the failing line. The helpers are plain
functions so the harness itself is tested below on pages written to ``tmp_path``.
"""

from __future__ import annotations

import linecache
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_SLOW = re.compile(r"<!--\s*slow\s*-->")
_SKIP = re.compile(r"#\s*doctest:\s*skip\s*")


@dataclass(frozen=True)
class Block:
    """One ```python block: its 1-based number among the page's python blocks and its code."""

    number: int
    first_line: int  # line of the page where the code starts (after the opening fence)
    source: str

    @property
    def skipped(self) -> bool:
        lines = self.source.splitlines()
        return bool(lines) and _SKIP.fullmatch(lines[0].strip()) is not None


def extract_blocks(text: str, page: str = "<page>") -> list[Block]:
    """Return the ```python blocks of a Markdown text, in order.

    Follows CommonMark fences: ``` or ~~~, closed by the same character at least as long,
    indentation of the opening fence removed from the code. Other languages are ignored,
    including python shown inside a longer fence.

    >>> [b.source for b in extract_blocks("```python\\nx = 1\\n```\\n```bash\\nls\\n```\\n")]
    ['x = 1\\n']
    """
    blocks: list[Block] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i].rstrip("\r\n"))
        # A backtick fence's info string may not contain backticks (that is inline code).
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        words = opening["info"].split()
        language = words[0].lower() if words else ""
        start = i + 1
        end = start
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(fence[0] * len(fence)) and set(closing) == {fence[0]}:
                break
            end += 1
        else:
            raise ValueError(f"{page}: the fence opened on line {i + 1} is never closed")
        if language == "python":
            body = [_dedent(line, indent) for line in lines[start:end]]
            blocks.append(Block(len(blocks) + 1, start + 1, "".join(body)))
        i = end + 1
    return blocks


def _dedent(line: str, width: int) -> str:
    stripped = len(line) - len(line.lstrip(" "))
    return line[min(stripped, width) :]


def is_slow(text: str) -> bool:
    """True when the page carries the ``<!-- slow -->`` tag."""
    return _SLOW.search(text) is not None


def _failure_message(page: Path, block: Block, filename: str, err: BaseException) -> str:
    lineno: int | None = None
    if isinstance(err, SyntaxError) and err.filename == filename:
        lineno = err.lineno
    else:
        for frame, frame_lineno in traceback.walk_tb(err.__traceback__):
            if frame.f_code.co_filename == filename:
                lineno = frame_lineno  # keep the deepest frame that is inside this block
    code_lines = block.source.splitlines()
    if lineno is not None and 1 <= lineno <= len(code_lines):
        where = (
            f"line {lineno} of the block (line {block.first_line + lineno - 1} of the page):\n"
            f"    {code_lines[lineno - 1].strip()}"
        )
    else:
        where = "an unknown line of the block"
    # Drop the harness's own exec frame; the page's frames are what the reader needs.
    tb = err.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    trace = "".join(traceback.format_exception(type(err), err, tb))
    return (
        f"{page.name}: python block {block.number} failed at {where}\n"
        f"{type(err).__name__}: {err}\n\n{trace}"
    )


def run_page(page: Path) -> int:
    """Run every python block of ``page`` in one namespace; return how many blocks ran.

    Raises ``pytest.fail`` naming the page, block and line on the first failing block.
    """
    blocks = extract_blocks(page.read_text(encoding="utf-8"), page.name)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    ran = 0
    for block in blocks:
        if block.skipped:
            continue
        filename = f"<{page.name} block {block.number}>"
        # Registering the code lets tracebacks print the failing source line.
        linecache.cache[filename] = (
            len(block.source),
            None,
            block.source.splitlines(keepends=True),
            filename,
        )
        failure = None
        try:
            exec(compile(block.source, filename, "exec"), namespace)
        except Exception as err:
            failure = _failure_message(page, block, filename, err)
        # Failing outside the except block keeps pytest from printing the chained error twice.
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        ran += 1
    return ran


def collect_pages(docs_dir: Path) -> list[Any]:
    """One ``pytest.param`` per ``*.md`` page, id = file name, ``slow`` mark where tagged."""
    params = []
    for page in sorted(docs_dir.glob("*.md")):
        marks = [pytest.mark.slow] if is_slow(page.read_text(encoding="utf-8")) else []
        params.append(pytest.param(page, id=page.name, marks=marks))
    return params


@pytest.fixture
def docs_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # Pages that plot must not need a display.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield work
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


# With no pages yet the parametrization is empty, which pytest reports as one skip.
@pytest.mark.parametrize("page", collect_pages(DOCS_DIR))
def test_docs_page(page: Path, docs_sandbox: Path) -> None:
    run_page(page)


# ----------------------------------------------------------------------------- the harness

SAMPLE = """\
# Title

```python
x = 1
```

Some text with `inline` code and a shell example:

```bash
rm -rf /
```

```text
not = python
```

~~~python title="tilde"
y = x + 1
~~~

````markdown
```python
never = run
```
````

1. A list item:

   ```python
   if y:
       z = y * 2
   ```

```python
# doctest: skip
raise RuntimeError("skipped")
```
"""


def test_extract_blocks_finds_only_python() -> None:
    blocks = extract_blocks(SAMPLE)
    assert [b.source for b in blocks] == [
        "x = 1\n",
        "y = x + 1\n",
        "if y:\n    z = y * 2\n",
        '# doctest: skip\nraise RuntimeError("skipped")\n',
    ]
    assert [b.number for b in blocks] == [1, 2, 3, 4]
    assert [b.first_line for b in blocks] == [4, 18, 30, 35]
    assert [b.skipped for b in blocks] == [False, False, False, True]


def test_extract_blocks_handles_no_blocks_and_unclosed_fences() -> None:
    assert extract_blocks("# Nothing\n\nplain text\n") == []
    with pytest.raises(ValueError, match="page.md: the fence opened on line 2 is never closed"):
        extract_blocks("x\n```python\ny = 1\n", "page.md")


def test_is_slow() -> None:
    assert is_slow("intro\n<!-- slow -->\n")
    assert is_slow("<!--slow-->")
    assert not is_slow("this page is slow to read")


def test_collect_pages_ids_and_marks(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("<!-- slow -->\n")
    (tmp_path / "a.md").write_text("fast\n")
    (tmp_path / "notes.txt").write_text("ignored\n")
    params = collect_pages(tmp_path)
    assert [p.id for p in params] == ["a.md", "b.md"]
    assert [[m.name for m in p.marks] for p in params] == [[], ["slow"]]
    assert collect_pages(tmp_path / "missing") == []


def test_run_page_shares_namespace_and_writes_in_cwd(tmp_path: Path, docs_sandbox: Path) -> None:
    page = tmp_path / "ok.md"
    page.write_text(
        SAMPLE
        + "```python\nopen('out.txt', 'w').write(str(z))\nassert __name__ == '__main__'\n```\n"
    )
    assert run_page(page) == 4
    assert (docs_sandbox / "out.txt").read_text() == "4"


def test_run_page_reports_page_block_and_line(tmp_path: Path, docs_sandbox: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text("# Broken\n\n```python\na = 1\n```\n\n```python\nb = 2\nc = a / 0\n```\n")
    with pytest.raises(pytest.fail.Exception) as info:
        run_page(page)
    message = str(info.value)
    assert "broken.md: python block 2 failed at line 2 of the block (line 9 of the page)" in message
    assert "    c = a / 0" in message
    assert "ZeroDivisionError" in message


def test_run_page_reports_errors_raised_in_nested_calls(tmp_path: Path, docs_sandbox: Path) -> None:
    page = tmp_path / "nested.md"
    page.write_text("```python\ndef f():\n    return {}['missing']\n\nf()\n```\n")
    with pytest.raises(pytest.fail.Exception) as info:
        run_page(page)
    # The deepest line inside the block is the one that actually failed.
    assert "nested.md: python block 1 failed at line 2 of the block" in str(info.value)
    assert "return {}['missing']" in str(info.value)


def test_run_page_reports_syntax_errors(tmp_path: Path, docs_sandbox: Path) -> None:
    page = tmp_path / "syntax.md"
    page.write_text("```python\nok = 1\nthis is not python\n```\n")
    with pytest.raises(pytest.fail.Exception) as info:
        run_page(page)
    assert "syntax.md: python block 1 failed at line 2 of the block" in str(info.value)
    assert "this is not python" in str(info.value)
