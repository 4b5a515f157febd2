"""hlo.py: collectives, replica groups and bytes read from HLO text."""

import hlo
import pytest

MESH_FORM = (
    "%all-to-all.6 = (f32[3,3,1,2,4]{4,3,2,1,0}, f32[3,3,1,2,4]{4,3,2,1,0})"
    " all-to-all(%a, %b), channel_id=1, replica_groups=mesh['axis_0'=1,"
    "'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, "
    'metadata={op_name="jit(f)/custom_partitioning"}')


@pytest.mark.parametrize("groups,want", [
    ("{{0,1},{2,3}}", ((0, 1), (2, 3))),
    ("{}", ((0, 1, 2, 3),)),
    ("[2,2]<=[4]", ((0, 1), (2, 3))),
    ("[2,2]<=[2,2]T(1,0)", ((0, 2), (1, 3))),
    ("mesh['x'=2,'y'=2] {'x'}", ((0, 2), (1, 3))),
    ("mesh['x'=2,'y'=2] {'y'}", ((0, 1), (2, 3))),
])
def test_replica_group_forms(groups, want):
  line = (f"%ag = f32[4]{{0}} all-gather(%p), replica_groups={groups}, "
          "dimensions={0}")
  (op,) = hlo.collectives(line, 4)
  assert op.kind == "all-gather" and op.bytes == 16
  assert op.groups == want


def test_mesh_form_with_device_ids():
  (op,) = hlo.collectives(MESH_FORM, 8)
  assert op.kind == "all-to-all"
  assert op.bytes == 2 * 3 * 3 * 1 * 2 * 4 * 4  # a tuple of two f32 arrays
  # device_ids [0,4,1,5,2,6,3,7] laid over the (1, 4, 2) mesh; groups run
  # along its axis of 4.
  assert op.groups == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_traffic():
  line = ("%a2a = f32[8]{0} all-to-all(%p), replica_groups={{0,1,2,3}}, "
          "dimensions={0}")
  ops = hlo.collectives(line, 4)
  # 32 bytes per device in a group of 4: 3/4 of it leaves the device; with
  # devices 2 and 3 on another process, 2/4 of it leaves the process.
  assert hlo.traffic(ops, [0, 0, 1, 1]) == {"sent": 24, "cross_process": 16}
  assert hlo.traffic(ops, [0, 0, 0, 0]) == {"sent": 24, "cross_process": 0}


def test_collective_permute_and_async_start():
  line = ("%cp = f32[2]{0} collective-permute-start(%p), "
          "source_target_pairs={{0,1},{1,0}}")
  (op,) = hlo.collectives(line, 2)
  assert op.kind == "collective-permute" and op.groups == ((0, 1), (1, 0))
  assert hlo.traffic([op], [0, 1]) == {"sent": 8, "cross_process": 8}


def test_no_collectives_and_unknown_groups():
  assert not hlo.collectives("%add = f32[2]{0} add(%a, %b)", 2)
  with pytest.raises(ValueError, match="replica_groups"):
    hlo.collectives("%ar = f32[2]{0} all-reduce(%a), to_apply=%s", 2)
