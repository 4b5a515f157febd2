"""Tests of kernel selection: the heuristic and the exact helpers."""

from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import optax
import pytest

from _models import as_pure
from _models import LINEN_MIXED_CONVS
from _models import LINEN_MIXED_INPUT
from _models import LinenCNN
from _models import LinenMixed
from _models import NNX_MIXED_CONVS
from _models import NNXMixed
import optax_cdg
from optax_cdg import _selection


def _selected(spec_tree):
  """Paths of the truthy values of a spec tree."""
  leaves = jax.tree_util.tree_flatten_with_path(
      spec_tree, is_leaf=_selection.is_spec_leaf)[0]
  return {_selection.path_names(p): s for p, s in leaves
          if s is not None and s is not False}


def _linen_mixed_params():
  return jax.eval_shape(LinenMixed().init, jax.random.key(0),
                        LINEN_MIXED_INPUT)["params"]


class HeuristicTest(parameterized.TestCase):

  def test_cnn_with_batchnorm_and_dense(self):
    params = jax.eval_shape(LinenCNN().init, jax.random.key(0),
                            jnp.ones((1, 8, 8, 1)))["params"]
    assert set(_selected(optax_cdg.conv_kernels(params))) == {
        ("Conv_0", "kernel"), ("Conv_1", "kernel")}

  def test_leaves_attention_and_general_dense_alone(self):
    got = set(_selected(optax_cdg.conv_kernels(_linen_mixed_params())))
    for path in got:
      assert not any(p.startswith(("MultiHeadDotProductAttention",
                                   "DenseGeneral", "Einsum")) for p in path)
    # Its documented limit: a DenseGeneral with a custom name looks like a
    # conv kernel, and transpose_kernel's output axis is not known.
    assert ("proj", "kernel") in got
    assert set(LINEN_MIXED_CONVS) <= got

  def test_nnx_states_of_variables_and_pure_states(self):
    model = NNXMixed(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for tree in (state, as_pure(state)):
      got = set(_selected(optax_cdg.conv_kernels(tree)))
      assert set(NNX_MIXED_CONVS) <= got
      assert not any("attn" in p for p in got)
      assert ("proj", "kernel") in got  # the documented limit again

  def test_skips_non_float_and_small_leaves(self):
    tree = {"a": {"kernel": jnp.ones((3, 3, 2), jnp.int32)},
            "b": {"kernel": jnp.ones((3, 2))},
            "c": {"kernel": jnp.ones((3, 3, 2))},
            "d": None, "e": optax.MaskedNode()}
    out = optax_cdg.conv_kernels(tree)
    assert _selected(out) == {("c", "kernel"): True}
    assert out["d"] is None and isinstance(out["e"], optax.MaskedNode)


class ExactHelpersTest(parameterized.TestCase):

  def test_linen_selects_exactly_the_convs(self):
    params = _linen_mixed_params()
    sel = optax_cdg.linen_conv_kernels(LinenMixed(), LINEN_MIXED_INPUT)
    got = _selected(sel(params))
    assert got == {p: optax_cdg.KernelSpec(*v)
                   for p, v in LINEN_MIXED_CONVS.items()}

  def test_linen_with_concrete_inputs_and_kwargs(self):
    sel = optax_cdg.linen_conv_kernels(LinenCNN(), jnp.ones((1, 8, 8, 1)),
                                       train=True)
    params = LinenCNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    assert set(_selected(sel(params["params"]))) == {
        ("Conv_0", "kernel"), ("Conv_1", "kernel")}

  def test_nnx_selects_exactly_the_convs(self):
    model = NNXMixed(nnx.Rngs(0))
    sel = optax_cdg.nnx_conv_kernels(model)
    state = nnx.state(model, nnx.Param)
    want = {p: optax_cdg.KernelSpec(*v) for p, v in NNX_MIXED_CONVS.items()}
    assert _selected(sel(state)) == want
    assert _selected(sel(as_pure(state))) == want

  def test_wrong_tree_is_an_error(self):
    sel = optax_cdg.linen_conv_kernels(LinenCNN(), jnp.ones((1, 8, 8, 1)))
    variables = LinenCNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="none of the 2 conv kernels"):
      sel(variables)  # the whole variables dict, not its "params"
    other = LinenCNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="shape"):
      sel(other["params"])

  def test_helpers_reject_the_wrong_model_kind(self):
    with pytest.raises(TypeError, match="flax.linen.Module"):
      optax_cdg.linen_conv_kernels(NNXMixed(nnx.Rngs(0)))
    with pytest.raises(TypeError, match="flax.nnx.Module"):
      optax_cdg.nnx_conv_kernels(LinenCNN())


class SelectedAxesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("output", True, "output", (3,)),
      ("input", True, "input", (2,)),
      ("spatial", True, "spatial", (0, 1)),
      ("transposed_output", -2, "output", (2,)),
      ("transposed_input", -2, "input", (3,)),
      ("positive_axis", 3, "output", (3,)),
      ("stacked_spatial", optax_cdg.KernelSpec(-1, 1), "spatial", (1,)),
      ("not_selected", False, "output", None),
      ("none", None, "output", None),
      # Any layout (the old main refused output axes 0 and 1).
      ("oihw_output", 0, "output", (0,)),
      ("oihw_spec_output", optax_cdg.KernelSpec(0, input_axis=1), "output",
       (0,)),
      ("oihw_input", optax_cdg.KernelSpec(0, input_axis=1), "input", (1,)),
      ("oihw_spatial", optax_cdg.KernelSpec(0, input_axis=1), "spatial",
       (2, 3)),
      ("hwoi_input", optax_cdg.KernelSpec(-2, input_axis=-1), "input", (3,)),
      ("middle_spatial", optax_cdg.KernelSpec(1, input_axis=3), "spatial",
       (0, 2)),
      ("stacked_oihw_spatial", optax_cdg.KernelSpec(1, 1, 2), "spatial",
       (3,)),
      ("stacked_oihw_input", optax_cdg.KernelSpec(1, 1, 2), "input", (2,)),
  )
  def test_axes(self, spec, direction, axes):
    leaf = jnp.ones((3, 3, 4, 8))
    assert _selection.selected_axes(spec, (), leaf, direction) == axes

  @parameterized.named_parameters(
      ("axis", 4, (3, 3, 4, 8), "output", ValueError,
       r"output axis 4 .*allowed -4 \.\. 3"),
      ("input_axis", optax_cdg.KernelSpec(0, input_axis=-5), (3, 3, 4, 8),
       "input", ValueError, "input axis -5"),
      ("no_input_axis", 0, (8, 4, 3, 3), "input", ValueError,
       r"needs the input-channel axis.*input_axis=1"),
      ("no_input_axis_spatial", optax_cdg.KernelSpec(1), (8, 4, 3, 3),
       "spatial", ValueError, "input_axis=2"),
      ("same_axes", optax_cdg.KernelSpec(0, input_axis=-4), (8, 4, 3, 3),
       "spatial", ValueError, "must differ"),
      ("output_stacked", optax_cdg.KernelSpec(0, 1, 2), (2, 8, 4, 3),
       "output", ValueError, "output axis 0 .* stacked"),
      ("input_stacked", optax_cdg.KernelSpec(1, 1, 0), (2, 8, 4, 3),
       "input", ValueError, "input axis 0 .* stacked"),
      ("bool_axis", optax_cdg.KernelSpec(True), (8, 4, 3, 3), "output",
       TypeError, "output axis True"),
      ("stacked", optax_cdg.KernelSpec(-1, 3), (3, 3, 4, 8), "output",
       ValueError, "stacked_axes=3"),
      ("no_spatial", True, (4, 8), "spatial", ValueError, "spatial axes"),
      ("vector", True, (8,), "output", ValueError, "needs 2 channel axes"),
      ("value", "yes", (3, 4, 8), "output", TypeError,
       "kernels is the str 'yes', not a selection of conv kernels; expected "
       "None"),
  )
  def test_errors(self, spec, shape, direction, error, message):
    with pytest.raises(error, match=message):
      _selection.selected_axes(spec, (), jnp.ones(shape), direction)

  def test_non_float_leaf(self):
    with pytest.raises(TypeError, match="real floating-point"):
      _selection.selected_axes(True, (), jnp.ones((3, 4, 8), jnp.int32),
                              "output")


class StepCountTest(parameterized.TestCase):
  """What optax.inject_hyperparams hands a callable `kernels`: the count."""

  def test_conv_kernels_names_static_args(self):
    count = jnp.zeros([], jnp.int32)
    with pytest.raises(TypeError, match=r"conv_kernels was called with "
                       r"Array\(0, dtype=int32\).*static_args"):
      optax_cdg.conv_kernels(count)
    with pytest.raises(TypeError, match="static_args"):
      jax.jit(optax_cdg.conv_kernels)(count)  # a traced count too

  def test_helpers_name_static_args(self):
    sel = optax_cdg.linen_conv_kernels(LinenCNN(), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(TypeError, match="linen module LinenCNN was called "
                       "with.*static_args"):
      sel(jnp.zeros([], jnp.int32))

  def test_scalar_float_leaf_is_still_a_tree(self):
    # Only an integer scalar is taken for a step count.
    assert optax_cdg.conv_kernels(jnp.ones([])) is False
