"""The collectives of a compiled SPMD program and the bytes they move.

Read from the optimized HLO text (`jax.jit(f).lower(x).compile().as_text()`).
For each collective instruction: its kind, the bytes of its result on one
device (the sum over a tuple result), and its replica groups (partition ids,
that is positions in the program's device assignment, which for arrays placed
with a `NamedSharding` is the mesh's device order). From these, per device:

- `sent`: bytes a device sends to the other members of its group, taken as
  B (g - 1) / g for a result of B bytes in a group of g (exact for
  all-to-all and all-gather; for an all-reduce, which a ring does in about
  twice that, a lower bound); a collective-permute's source sends B;
- `cross_process`: the part of `sent` that goes to devices of other
  processes, B m / g with m the group members on another process.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
         "reduce-scatter")
_OP = re.compile(r"=\s*(?P<shape>.*?)\s+(?P<kind>" + "|".join(KINDS)
                 + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64,
         "f64": 64, "c64": 64, "c128": 128}


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  bytes: int                       # the result on one device
  groups: tuple[tuple[int, ...], ...]
  line: str


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, `f32[3,3,2,4]{...}` or a tuple of them."""
  total = 0
  for m in _ARRAY.finditer(shape):
    if m.group("dtype") not in _BITS:
      raise ValueError(f"unknown HLO element type in {shape!r}")
    dims = [int(d) for d in m.group("dims").split(",") if d]
    total += math.prod(dims) * _BITS[m.group("dtype")] // 8
  return total


def _iota_groups(text: str) -> np.ndarray | None:
  # [G,S]<=[d0,d1,...]T(p0,p1,...) or [G,S]<=[N]
  m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    return None
  g, s = int(m.group(1)), int(m.group(2))
  dims = [int(d) for d in m.group(3).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(4):
    ids = ids.transpose([int(p) for p in m.group(4).split(",")])
  return ids.reshape(g, s)


def _mesh_groups(text: str) -> np.ndarray | None:
  """mesh['x'=2,'y'=4] {'x'}, optionally with `, device_ids=(...)` before the
  braces: groups vary over the listed axes; device_ids (an iota `[d..]T(p..)`
  or a list) maps mesh positions, in row-major order, to partition ids."""
  m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]+\]"
               r"(?:T\([\d,]+\))?|[\d,]+)\))?\s*\{([^}]*)\}", text)
  if not m:
    return None
  axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
  ids = np.arange(math.prod(sizes))
  if m.group(2):
    iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", m.group(2))
    if iota:
      ids = ids.reshape([int(d) for d in iota.group(1).split(",")])
      if iota.group(2):
        ids = ids.transpose([int(p) for p in iota.group(2).split(",")])
      ids = ids.reshape(-1)
    else:
      ids = np.array([int(v) for v in m.group(2).split(",")])
  ids = ids.reshape(sizes)
  inner = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
  outer = [i for i in range(len(names)) if i not in inner]
  ids = ids.transpose(outer + inner)
  return ids.reshape(-1, math.prod(ids.shape[len(outer):]))


def replica_groups(line: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
  """The groups of partition ids of one collective instruction."""
  if "collective-permute" in line:  # (source, target) pairs
    m = re.search(r"source_target_pairs=\{(.*?\})\}", line)
    return tuple((int(a), int(b))
                 for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1)))
  m = re.search(r"replica_groups=(\{\{.*?\}\}|\{\}"
                r"|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?"
                r"|mesh\[[^\]]*\](?:,\s*device_ids=\([^{]*\))?\s*\{[^}]*\})",
                line)
  if m is None:
    raise ValueError(f"no replica_groups in HLO line: {line.strip()}")
  text = m.group(1)
  if text == "{}":  # one group of every device
    return (tuple(range(num_devices)),)
  if text.startswith("{{"):
    return tuple(tuple(int(v) for v in g.split(","))
                 for g in re.findall(r"\{([\d,]+)\}", text[1:-1]))
  for parse in (_iota_groups, _mesh_groups):
    ids = parse(text)
    if ids is not None:
      return tuple(tuple(int(v) for v in row) for row in ids)
  raise ValueError(f"unparsed replica_groups {text!r}")


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective instruction in an optimized HLO module's text."""
  found = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m is None or line.lstrip().startswith("ROOT %tuple"):
      continue
    found.append(Collective(m.group("kind"), shape_bytes(m.group("shape")),
                            replica_groups(line, num_devices), line.strip()))
  return found


def traffic(ops: Sequence[Collective],
            device_process: Sequence[int]) -> dict[str, int]:
  """Bytes a device sends, in all and to other processes (the most of any
  device)."""
  n = len(device_process)
  sent, cross = np.zeros(n), np.zeros(n)
  for op in ops:
    if op.kind == "collective-permute":  # the source sends its whole buffer
      for a, b in op.groups:
        sent[a] += op.bytes
        cross[a] += op.bytes * (device_process[a] != device_process[b])
      continue
    for group in op.groups:
      g = len(group)
      for d in group:
        sent[d] += op.bytes * (g - 1) / g
        others = sum(device_process[e] != device_process[d] for e in group)
        cross[d] += op.bytes * others / g
  return {"sent": int(round(sent.max())) if n else 0,
          "cross_process": int(round(cross.max())) if n else 0}
