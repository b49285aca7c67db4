"""The Python blocks of the README and docs/ marked runnable run as written (in process, or on
2 gloo ranks), and the figures they quote from the code are the code's."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compressed_comm.codecs import get_codec

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- runnable(?:: (\d+) ranks)? -->\s*```python\n(.*?)```", re.S)


def blocks(pages: list[Path] = DOCS) -> list[tuple[int, str]]:
    return [(int(ranks or 1), code) for page in pages
            for ranks, code in BLOCK.findall(page.read_text())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, world: int, port: int, code: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    Path(out_dir, f"rank{rank}.txt").write_text(printed.getvalue())


def test_the_docs_have_runnable_blocks_of_both_kinds():
    kinds = [ranks for ranks, _ in blocks()]
    assert kinds.count(1) >= 2 and kinds.count(2) >= 2
    assert blocks([README]), "the README's drop-in example runs"


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs_as_written(index, tmp_path):
    ranks, code = blocks()[index]
    mp.spawn(_run_rank, args=(ranks, _free_port(), code, str(tmp_path)), nprocs=ranks, join=True)
    printed = [(tmp_path / f"rank{r}.txt").read_text() for r in range(ranks)]
    for line in re.findall(r"print\((.*)\)", code):  # whatever a block prints, it printed
        assert all(p.strip() for p in printed), line


CODEC_ROW = re.compile(r"^\| `(\w+)(?::[RF])?` \|.*\| (?:[RF]=([\d.]+): )?([\d,]+) B \(", re.M)
DEMO_ROW = re.compile(
    r"^(\w+(?::[\d.]+)?) +([\d,]+) +[\d.]+x +[\d.]+x +[\d.e+-]+ +[\d.e+-]+$", re.M)


def test_the_quoted_payload_sizes_are_the_codes():
    text = "\n".join(page.read_text() for page in DOCS)
    table = [(name + (f":{param}" if param else ""), size)
             for name, param, size in CODEC_ROW.findall(text)]
    demo = DEMO_ROW.findall(text)
    assert len(table) >= 9 and len(demo) >= 9
    for spec, size in table + demo:
        assert int(size.replace(",", "")) == get_codec(spec).payload_nbytes(
            (4096, 3072), torch.float16), spec


def test_the_end_to_end_speedup_table_is_the_committed_runs():
    """The README's speedup table is what bench/plot_e2e.py prints for the bench/e2e.py runs
    committed in docs/data (the picture beside it is drawn from the same files)."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import plot_e2e
    from results import E2EResult

    files = sorted((REPO / "docs" / "data").glob("e2e_*_[0-9].json"))
    assert len(files) >= 4, files
    table = plot_e2e.markdown_table([E2EResult.read(f) for f in files])
    assert table in README.read_text(), table
