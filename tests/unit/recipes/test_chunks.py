"""Pass planning for sweeps: every cell once, chunk limits, resume points, index shifts."""

from __future__ import annotations

import math

import pytest
from oculi_dsl.recipes._batching import Edit
from oculi_dsl.recipes._chunks import first_position, plan_chunks, shifted

from oculi_dsl.testing import tiny_model

GRID = [(lay, tok) for lay in range(30) for tok in range(1, 10) for _ in range(3)]  # the benchmark


def work(chunks: list, n_layers: int = 30, n_tok: int = 10) -> int:
    return sum((len(c.cells) + 1) * (n_layers - c.layer) * (n_tok - c.position) for c in chunks)


@pytest.mark.parametrize("per_chunk, spare", [(102, 0), (102, 1), (7, 1), (1000, 1), (40, 0)])
def test_every_cell_once_within_limits(per_chunk: int, spare: int) -> None:
    layers, positions = [g[0] for g in GRID], [g[1] for g in GRID]
    chunks = plan_chunks(layers, positions, per_chunk, 30, 10, 1, spare)
    assert sorted(i for c in chunks for i in c.cells) == list(range(len(GRID)))
    assert all(len(c.cells) <= per_chunk for c in chunks)
    assert len(chunks) <= math.ceil(len(GRID) / per_chunk) + spare
    assert (chunks[0].layer, chunks[0].position) == (0, 0)  # the first pass runs in full
    for c in chunks:  # a pass never starts after what its cells patch
        assert c.layer <= min(layers[i] for i in c.cells)
        assert c.position <= min(positions[i] for i in c.cells)


def test_a_spare_pass_is_taken_only_when_it_pays() -> None:
    layers, positions = [g[0] for g in GRID], [g[1] for g in GRID]
    fewest = plan_chunks(layers, positions, 102, 30, 10, 1, 0)
    spare = plan_chunks(layers, positions, 102, 30, 10, 1, 1)
    assert (len(fewest), len(spare)) == (8, 9)
    assert work(spare) <= 0.85 * work(fewest)
    # one position only: splitting by position gains nothing, so no extra pass
    flat = plan_chunks(layers, [5] * len(GRID), 102, 30, 10, 1, 1)
    assert len(flat) == 8


def test_first_position_and_shift_follow_the_site_dims() -> None:
    model = tiny_model("llama")
    z = Edit("attn.z", 2, (5, 1))  # (token, head, d_head)
    q = Edit("attn.q", 2, (1, -2))  # (head, token, d_head), negative from the end
    assert first_position(model, z, 8) == 5 and first_position(model, q, 8) == 6
    assert first_position(model, Edit("attn.pattern", 2, (1, 5)), 8) == 0  # keys: no resume
    assert first_position(model, Edit("mlp.out", 2, None), 8) == 0  # the whole site
    assert shifted(model, z, 3, 8).index == (2, 1) and shifted(model, q, 4, 8).index == (1, 2)
    assert shifted(model, z, 0, 8) is z
