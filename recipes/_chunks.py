"""Which cells of a sweep share a forward pass, and where each pass may start.

A patch at layer l and position t cannot change anything at earlier layers, nor at earlier
positions of any layer (attention is causal). So a pass whose cells all patch at layer >= s and
position >= c only needs layers s.. and positions c..: the first pass of a sweep also saves both
runs' layer inputs and attention keys/values, and every later pass resumes from them
(``resid_pre`` of layer s assigned, ``past=`` keys/values of positions < c).

:func:`plan_chunks` groups cells into blocks of similar (first layer, first position) with at
most ``per_chunk`` cells each, in at most one pass more than the fewest possible, choosing the
grouping that runs the fewest rows × layers × positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from oculi_dsl.past import KEY_AXIS_SITES

MAX_TOKEN_GROUPS = 6
SPARE_GAIN = 0.85  # an extra pass must cut the work to run to this fraction or less


@dataclass(frozen=True)
class Chunk:
    """Cells (indices) run in one pass, resumed at ``layer`` and ``position`` (0, 0: in full)."""

    cells: tuple[int, ...]
    layer: int
    position: int


def first_position(model: Any, edit: Any, n_tok: int) -> int:
    """The earliest position an edit changes (0 when it spans positions or sees keys)."""
    if edit.site in KEY_AXIS_SITES or edit.index is None:
        return 0
    dims = model.family.layer_sites[edit.site].dims
    if "token" not in dims or dims.index("token") >= len(edit.index):
        return 0
    token = edit.index[dims.index("token")]
    return token % n_tok if isinstance(token, int) else 0


def shifted(model: Any, edit: Any, position: int, n_tok: int) -> Any:
    """The edit indexed in a pass that runs positions ``position``.. only."""
    if position == 0:
        return edit
    axis = model.family.layer_sites[edit.site].dims.index("token")
    index = list(edit.index)
    index[axis] = index[axis] % n_tok - position
    return replace(edit, index=tuple(index))


def plan_chunks(first_layer: Sequence[int], first_pos: Sequence[int], per_chunk: int,
                n_layers: int, n_tok: int, rows_per_cell: int, spare: int = 0) -> list[Chunk]:
    """Blocks of cells, each of at most ``per_chunk`` cells; the first block runs in full (it
    saves what the others resume from). Up to ``spare`` passes more than the fewest are used
    when that cuts the rows × layers × positions to run by at least ``SPARE_GAIN``."""
    fewest = math.ceil(len(first_layer) / per_chunk)
    best: dict[bool, tuple[float, list[Chunk]]] = {}
    for groups in _token_groups(first_pos, min(MAX_TOKEN_GROUPS, len(set(first_pos)))):
        chunks: list[Chunk] = []
        for members in groups:
            members = sorted(members, key=lambda i: (first_layer[i], first_pos[i]))
            size = math.ceil(len(members) / math.ceil(len(members) / per_chunk))
            for j in range(0, len(members), size):
                part = tuple(members[j:j + size])
                chunks.append(Chunk(part, min(first_layer[i] for i in part),
                                    min(first_pos[i] for i in part)))
        if len(chunks) > fewest + spare:
            continue
        # the block that would run the most anyway goes first and runs in full
        chunks.sort(key=lambda c: -(n_layers - c.layer) * (n_tok - c.position))
        chunks[0] = Chunk(chunks[0].cells, 0, 0)
        cost = sum((len(c.cells) * rows_per_cell + 1) * (n_layers - c.layer) * (n_tok - c.position)
                   for c in chunks)
        extra = len(chunks) > fewest
        if extra not in best or cost < best[extra][0]:
            best[extra] = (cost, chunks)
    if True in best and (False not in best or best[True][0] <= SPARE_GAIN * best[False][0]):
        return best[True][1]
    return best[False][1]


def _token_groups(first_pos: Sequence[int], most: int) -> list[list[list[int]]]:
    """For g = 1..most: the cells split into g runs of positions with balanced cell counts."""
    by_pos: dict[int, list[int]] = {}
    for i, p in enumerate(first_pos):
        by_pos.setdefault(p, []).append(i)
    positions = sorted(by_pos)
    out = []
    for g in range(1, max(most, 1) + 1):
        target = len(first_pos) / g
        groups: list[list[int]] = []
        current: list[int] = []
        for p in positions:
            current += by_pos[p]
            if len(current) >= target * 0.999 and len(groups) < g - 1:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        out.append(groups)
    return out
