"""Which leaves of an updates tree are conv kernels, and along which axes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import importlib
import numbers
import re
import sys
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_cdg import _checks


class KernelSpec(NamedTuple):
  """How one selected leaf is laid out: which axes are channels.

  Axes count in the leaf itself (negative ones from its end). The default is
  Flax's layout `(*spatial, in, out)`.

  Attributes:
    output_axis: the output-channel axis: -1 for Flax's `Conv`, `ConvLocal`
      and `ConvTranspose`; -2 for `ConvTranspose(transpose_kernel=True)`;
      0 for OIHW (Equinox, PyTorch) kernels.
    num_stacked_axes: how many leading axes stack layers (`nn.scan`,
      `nnx.vmap`, `eqx.filter_vmap`, ...): neither channel nor spatial axes.
    input_axis: the input-channel axis, needed only by `direction="input"`
      and `"spatial"`. None means the other of the last two axes when
      `output_axis` is one of them (Flax's layouts), and is an error for
      those directions otherwise.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> optax_cdg.KernelSpec(output_axis=0, input_axis=1)  # OIHW
    KernelSpec(output_axis=0, num_stacked_axes=0, input_axis=1)
    >>> w = jnp.arange(8.0)[:, None, None, None] * jnp.ones((8, 4, 3, 3))
    >>> tx = optax_cdg.channel_directed(
    ...     1e-2, direction="input",
    ...     kernels={"w": optax_cdg.KernelSpec(output_axis=0, input_axis=1)})
    >>> out, _ = tx.update({"w": w}, tx.init({"w": w}))
    >>> bool(jnp.allclose(out["w"], w))  # constant along the input axis
    True
  """

  output_axis: int = -1
  num_stacked_axes: int = 0
  input_axis: int | None = None


class RecordedKernel(NamedTuple):
  """A conv kernel a helper recorded from a model."""

  spec: KernelSpec
  shape: tuple[int, ...]


# The conv kernels a helper recorded, by path.
Recorded = dict[tuple[str, ...], RecordedKernel]


class NoKernelsSelectedWarning(UserWarning):
  """Issued when `channel_directed` selects no leaf of an updates tree.

  The transform then returns the updates unchanged, which looks like
  success. Issued once per trace; silence it, or make it an error, with
  Python's warning filters.

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> grads = {"dense": {"kernel": jnp.ones((4, 2))}}
    >>> tx = optax_cdg.channel_directed()
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter("error", optax_cdg.NoKernelsSelectedWarning)
    ...   try:
    ...     tx.update(grads, tx.init(grads))
    ...   except optax_cdg.NoKernelsSelectedWarning as e:
    ...     print(str(e)[:33])
    channel_directed changed nothing:
  """


def is_spec_leaf(x: Any) -> bool:
  """A value of a `kernels` tree: None, a bool, an output axis or a spec."""
  return x is None or isinstance(x, (bool, numbers.Integral, KernelSpec))


def is_passthrough(x: Any) -> bool:
  """Leaves that Optax passes through untouched (None, masked nodes)."""
  return x is None or isinstance(x, optax.MaskedNode)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names along a key path, without the `.value` of an nnx Variable."""
  if path[-1:] == (jax.tree_util.GetAttrKey("value"),):
    path = path[:-1]
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def format_path(path: Sequence[Any]) -> str:
  """A leaf's place, as `conv/kernel`; the whole tree is "the updates"."""
  return "/".join(path_names(path)) or "the updates"


_NOT_CONV = re.compile(
    r"^(query|key|value|out|((DenseGeneral|LinearGeneral|Einsum|Fp8Einsum"
    r"|MultiHeadDotProductAttention|MultiHeadAttention|SelfAttention)"
    r"(_\d+)?))$")

STATIC_ARGS_HINT = (
    "optax.inject_hyperparams calls every callable argument with the step "
    "count: pass static_args=(\"kernels\",) to it.")


def reject_step_count(tree: Any, who: str) -> None:
  """A TypeError naming `static_args` when `tree` is a step count.

  `optax.inject_hyperparams` calls every callable argument with it; a
  selection of it would select nothing, silently.
  """
  if isinstance(tree, (jax.Array, np.ndarray, np.integer)) and (
      np.ndim(tree) == 0 and jnp.issubdtype(tree.dtype, jnp.integer)):
    raise TypeError(f"{who} was called with {tree!r}, a scalar integer, "
                    f"instead of a tree of updates. {STATIC_ARGS_HINT}")


def _equinox_conv(module: Any) -> Any:
  """The spec subtree of one Equinox conv: its weight (OIHW), nothing else."""
  w = module.weight
  # (out, in // groups, *kernel_size); axes before those: filter_vmap's.
  k = getattr(w, "ndim", -1) - module.num_spatial_dims - 2
  spec = (KernelSpec(output_axis=k, num_stacked_axes=k, input_axis=k + 1)
          if k >= 0 and jnp.issubdtype(w.dtype, jnp.floating) else False)
  return jax.tree_util.tree_map_with_path(  # None and masked leaves stay
      lambda p, x: spec if path_names(p) == ("weight",) else False, module)


def conv_kernels(tree: Any) -> Any:
  """Guesses which leaves are conv kernels, from the tree alone.

  Inside Equinox modules the selection is exact, by class: the `weight` of
  every `eqx.nn.Conv` and `eqx.nn.ConvTranspose` (1-D to 3-D, grouped or
  not), as `KernelSpec(output_axis=0, input_axis=1)` shifted by any axes
  `eqx.filter_vmap` stacked; nothing else in an Equinox module.

  Elsewhere (Flax linen params, nnx states, plain dicts) a leaf is selected
  when it is named `kernel`, has at least 3 dimensions, is real floating
  point, and no part of its path is an attention sub-module (`query`, `key`,
  `value`, `out`) or a general dense module (`DenseGeneral`,
  `LinearGeneral`, `Einsum`, `MultiHeadDotProductAttention`,
  `MultiHeadAttention`, `SelfAttention`, with Flax's `_N` suffix).

  The guess is wrong for a renamed `DenseGeneral`, Dense kernels stacked by
  `nn.scan`, `ConvTranspose(transpose_kernel=True)` (output axis -2) and the
  layer axis of scanned convs: use :func:`linen_conv_kernels` or
  :func:`nnx_conv_kernels` there. Haiku's `w` is not guessed.

  Args:
    tree: a tree of parameters or updates (nnx states and Equinox models
      too).

  Returns:
    A tree of the same structure with `True` (a :class:`KernelSpec` in an
    Equinox conv) at each selected leaf and `False` elsewhere; None and
    masked leaves stay as they are.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> params = {"Conv_0": {"kernel": jnp.zeros((3, 3, 1, 8)),
    ...                      "bias": jnp.zeros(8)},
    ...           "Dense_0": {"kernel": jnp.zeros((8, 10))}}
    >>> optax_cdg.conv_kernels(params)
    {'Conv_0': {'bias': False, 'kernel': True}, 'Dense_0': {'kernel': False}}
  """
  reject_step_count(tree, "conv_kernels")
  eqx = sys.modules.get("equinox")  # imported by the user if modules exist
  convs = (eqx.nn.Conv, eqx.nn.ConvTranspose) if eqx else ()

  def is_module(x):
    return eqx is not None and isinstance(x, eqx.Module)

  def select(path, x):  # None and MaskedNode have no leaves: they stay
    if is_module(x):  # in a module, only its convs
      return jax.tree.map(
          lambda y: _equinox_conv(y) if isinstance(y, convs) else False,
          x, is_leaf=lambda y: isinstance(y, convs))
    names = path_names(path)
    return (bool(names) and names[-1] == "kernel" and np.ndim(x) >= 3
            and jnp.issubdtype(getattr(x, "dtype", object), jnp.floating)
            and not any(_NOT_CONV.match(n) for n in names[:-1]))

  return jax.tree_util.tree_map_with_path(select, tree, is_leaf=is_module)


@dataclasses.dataclass(frozen=True, eq=False)
class PathSelection:
  """A `kernels=` callable selecting the kernels recorded from a model.

  Matches leaves by path (an nnx Variable's `.value` ignored), so one
  selection serves `nnx.State`s of Variables, pure states and plain dicts.
  """

  recorded: Recorded
  source: str  # what recorded them, as "nnx model Net"
  params_hint: str  # how to get the parameters it selects in

  def __call__(self, updates: Any) -> Any:
    reject_step_count(updates, f"the selection of the {self.source}")
    seen = set()

    def select(path, leaf):
      names = path_names(path)
      if names not in self.recorded:
        return None if is_passthrough(leaf) else False
      seen.add(names)
      kernel = self.recorded[names]
      if not is_passthrough(leaf) and tuple(leaf.shape) != kernel.shape:
        raise ValueError(f"kernels: the {self.source} has {format_path(path)}"
                         f" of shape {kernel.shape}; the updates, "
                         f"{leaf.shape}.")
      return kernel.spec

    out = jax.tree_util.tree_map_with_path(select, updates,
                                           is_leaf=is_passthrough)
    if self.recorded and not seen:
      raise ValueError(
          f"kernels: none of the {len(self.recorded)} conv kernels of the "
          f"{self.source} (such as {'/'.join(next(iter(self.recorded)))}) is "
          f"in the updates: pass its parameters, {self.params_hint}.")
    return out


def _flax_api(name: str, helper: str, arg: str, value: Any) -> Any:
  """`name` (flax.linen or flax.nnx), once `value` is one of its modules."""
  try:
    api = importlib.import_module(name)
  except ImportError as e:
    raise ImportError(
        f"optax_cdg.{helper} needs Flax, and {name} cannot be imported "
        f"({e}). Install it with: pip install \"optax_cdg[flax]\"") from e
  if not isinstance(value, api.Module):
    raise TypeError(
        f"{arg} must be a {name}.Module; got {type(value).__name__}.")
  return api


def _record(specs: Recorded, names: tuple[str, ...], shape: Sequence[int],
            inner: Sequence[int], transposed: bool) -> None:
  """Records a conv kernel of per-layer shape `inner`, stacked to `shape`."""
  stacked = len(shape) - len(inner)
  if stacked < 0 or tuple(shape[stacked:]) != tuple(inner):  # not leading
    raise ValueError(f"kernels: {'/'.join(names)} of shape {tuple(shape)} "
                     f"does not stack its layers' {tuple(inner)}.")
  specs[names] = RecordedKernel(
      KernelSpec(output_axis=-2 if transposed else -1,
                 num_stacked_axes=stacked), tuple(shape))


def linen_conv_kernels(module: Any, *example_args: Any,
                       **example_kwargs: Any) -> PathSelection:
  """Selects exactly the conv kernels of a Flax linen module.

  Runs `module.init` abstractly (`jax.eval_shape`) with its method calls
  intercepted, and records every `nn.Conv`, `nn.ConvLocal` and
  `nn.ConvTranspose` (subclasses too) that is called, with its output axis
  (-2 for `transpose_kernel=True`) and any layer axes `nn.scan`/`nn.vmap`
  stacked onto its kernel.

  Args:
    module: a linen module.
    *example_args: example inputs for `module.init` (arrays or
      `jax.ShapeDtypeStruct` values).
    **example_kwargs: static keyword arguments for `module.init` (for example
      `train=False`).

  Returns:
    A value for `channel_directed(kernels=...)`: a callable that selects the
    recorded kernels in `module.init(...)["params"]` by path. Through
    `optax.inject_hyperparams` it needs `static_args=("kernels",)`.

  Examples:
    >>> import flax.linen as nn
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Conv(8, (3, 3))(x)
    ...     return nn.DenseGeneral((3, 4), name="proj")(x)  # kernel (8, 3, 4)
    >>> x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    >>> kernels = optax_cdg.linen_conv_kernels(Net(), x)
    >>> params = Net().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    >>> kernels(params["params"])["proj"]["kernel"]  # the guess would take it
    False
    >>> kernels(params["params"])["Conv_0"]["kernel"]
    KernelSpec(output_axis=-1, num_stacked_axes=0, input_axis=None)
  """
  nn = _flax_api("flax.linen", "linen_conv_kernels", "module", module)
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    m = context.module
    if context.method_name == "__call__" and isinstance(
        m, (nn.Conv, nn.ConvLocal, nn.ConvTranspose)) and (
            kernel := m.get_variable("params", "kernel")) is not None:
      found[tuple(m.path) + ("kernel",)] = (
          kernel.shape, getattr(m, "transpose_kernel", False))
    return out

  key = jax.random.key(0)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(
        functools.partial(module.init, **example_kwargs),
        {"params": key, "dropout": key}, *example_args)
  specs: Recorded = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables.get("params", {}))[0]:
    if (names := path_names(path)) in found:
      _record(specs, names, leaf.shape, *found[names])
  return PathSelection(specs, f"linen module {type(module).__name__}",
                       "module.init(...)['params']")


def nnx_conv_kernels(model: Any) -> PathSelection:
  """Selects exactly the conv kernels of a Flax nnx model.

  Walks the model's modules and records the `kernel` of every `nnx.Conv` and
  `nnx.ConvTranspose` (subclasses too; `nnx.ConvLocal` as well, in a Flax
  that has one: 0.12 has none), with its output axis (-2 for
  `transpose_kernel=True`) and any layer axes `nnx.vmap`/`nnx.scan` stacked
  onto it.

  Args:
    model: an `nnx.Module`.

  Returns:
    A value for `channel_directed(kernels=...)`: a callable that selects
    those kernels by path in `nnx.state(model, nnx.Param)`, of Variables (as
    `nnx.Optimizer.init` passes it) or pure arrays (as its `update` does).
    Through `optax.inject_hyperparams` it needs `static_args=("kernels",)`.

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> import optax_cdg
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    ...     self.up = nnx.ConvTranspose(8, 4, (2, 2), transpose_kernel=True,
    ...                                 rngs=rngs)
    >>> model = Net(nnx.Rngs(0))
    >>> kernels = optax_cdg.nnx_conv_kernels(model)
    >>> spec = kernels(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    >>> spec["up"]["kernel"].output_axis, spec["conv"]["bias"]
    (-2, False)
    >>> tx = optax.chain(optax_cdg.channel_directed(kernels=kernels),
    ...                  optax.adam(1e-3))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """
  nnx = _flax_api("flax.nnx", "nnx_conv_kernels", "model", model)
  convs = tuple(getattr(nnx, t) for t in ("Conv", "ConvTranspose", "ConvLocal")
                if hasattr(nnx, t))
  specs: Recorded = {}
  for path, m in nnx.iter_modules(model):
    if isinstance(m, convs) and getattr(m, "kernel", None) is not None:
      _record(specs, tuple(map(str, path)) + ("kernel",), jnp.shape(m.kernel),
              m.kernel_shape, getattr(m, "transpose_kernel", False))
  return PathSelection(specs, f"nnx model {type(model).__name__}",
                       "nnx.state(model, nnx.Param)")


def _spec_error(value: Any, path: Sequence[Any]) -> TypeError:
  """The error for a value of a `kernels` argument that is not a selection,
  with the one hint that fits it."""
  what, hint = _checks.describe(value), ""
  scalar = hasattr(value, "dtype") and np.ndim(value) == 0
  # What a callable that inject_hyperparams called with the step count
  # returns: a scalar computed from it, or (deeper in a tree) the count.
  if scalar and (not path or jnp.issubdtype(value.dtype, jnp.integer)):
    hint = f" {STATIC_ARGS_HINT}"
  elif scalar and jnp.issubdtype(value.dtype, jnp.bool_):
    hint = " Use a Python bool, not an array."
  elif hasattr(value, "shape") and path:
    hint = " For the parameters themselves, pass conv_kernels(params)."
  if not path:
    return TypeError(
        f"kernels is {what}, not a selection of conv kernels; expected None "
        "(to guess them), a model's selection (linen_conv_kernels(module, "
        "x) or nnx_conv_kernels(model)) or a dict of True, False, an output "
        f"axis or a KernelSpec per parameter.{hint}")
  return TypeError(
      f"kernels gives {what} for {format_path(path)}; expected True, False, "
      f"None, an output axis or a KernelSpec.{hint}")


def selected_axes(spec: Any, path: Sequence[Any], leaf: Any,
                  direction: str) -> tuple[int, ...] | None:
  """The axes a `kernels` value selects on a leaf, or None if it selects none.

  The value is None, a bool, an output axis (int) or a KernelSpec.
  """
  if spec is None or spec is False or is_passthrough(leaf):
    return None
  if spec is True or isinstance(spec, numbers.Integral):
    spec = KernelSpec(output_axis=-1 if spec is True else int(spec))
  elif not isinstance(spec, KernelSpec):
    raise _spec_error(spec, path)
  where, dtype = format_path(path), getattr(leaf, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    what = f"is a {type(leaf).__name__}, not an array" if dtype is None else (
        f"has dtype {dtype}")
    raise TypeError(f"kernels selects {where}, which {what}; only real "
                    "floating-point arrays can be transformed.")
  shape, stacked = tuple(leaf.shape), spec.num_stacked_axes
  if not 0 <= stacked <= len(shape) - 2:  # room for in and out channels
    raise ValueError(f"kernels selects {where} of shape {shape} with "
                     f"num_stacked_axes={stacked!r}: it needs 2 channel axes "
                     "after its stacked ones.")

  def axis(value, name):
    label = f"kernels: the {name} axis {value!r} at {where}"
    (a,) = _checks.axes((value,), shape, label)
    if a < stacked:
      raise ValueError(f"{label} is one of its {stacked} stacked axes.")
    return a

  out = axis(spec.output_axis, "output")
  last_two = (len(shape) - 2, len(shape) - 1)
  if spec.input_axis is not None:
    inp = axis(spec.input_axis, "input")
  elif out in last_two:  # Flax's layouts: the input axis is the other one
    inp = last_two[0] + last_two[1] - out
  else:
    inp = None
  if inp == out:
    raise ValueError(f"kernels: the input axis at {where} is its output axis "
                     f"{out}; they must differ.")
  if direction == "output":
    return (out,)
  if inp is None:
    raise ValueError(
        f"direction={direction!r} needs the input-channel axis of {where} "
        f"(shape {shape}): pass KernelSpec(output_axis={out}, input_axis=...)"
        f", input_axis={out + 1} for OIHW.")
  if direction == "input":
    return (inp,)
  spatial = tuple(a for a in range(stacked, len(shape)) if a not in (out, inp))
  if not spatial:
    raise ValueError(f"direction='spatial' needs spatial axes; {where} of "
                     f"shape {shape} has only channel and stacked axes.")
  return spatial


def map_selected(fn: Callable[[Any, tuple[int, ...]], Any], updates: Any,
                 kernels: Any, direction: str,
                 rest: Callable[[Any], Any] = lambda x: x) -> Any:
  """`fn(leaf, axes)` on every leaf a `kernels` argument selects, `rest(leaf)`
  on every other one (the very same object, by default)."""
  if kernels is None:
    kernels = conv_kernels(updates)
  elif callable(kernels):
    kernels = kernels(updates)
  specs, treedef = jax.tree_util.tree_flatten_with_path(
      kernels, is_leaf=lambda x: is_spec_leaf(x) or is_passthrough(x))
  try:
    # PyTreeDef comes from jaxlib's extension, which ships no type stubs.
    subtrees = treedef.flatten_up_to(updates)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as e:
    raise ValueError(
        "kernels does not match the updates: a kernels dict needs the "
        "parameters' keys and nesting (one value may stand for a sub-dict), "
        f"or pass kernels=None to guess. They differ: {e}") from e

  def leaf_fn(path, spec, p, x):
    axes = selected_axes(spec, path + p, x, direction)
    return rest(x) if axes is None else fn(x, axes)

  out = [jax.tree_util.tree_map_with_path(
      functools.partial(leaf_fn, path, spec), sub, is_leaf=is_passthrough)
         for (path, spec), sub in zip(specs, subtrees, strict=True)]
  return jax.tree_util.tree_unflatten(treedef, out)


def check_kernels(kernels: Any) -> None:
  """The build-time check of a `kernels` argument."""
  if any(isinstance(kernels, getattr(sys.modules.get(lib), "Module", ()))
         for lib in ("flax.nnx", "flax.linen", "equinox")):
    raise TypeError(
        f"kernels={type(kernels).__name__}(...) is a model, not a selection "
        "of its conv kernels: pass optax_cdg.nnx_conv_kernels(model), "
        "optax_cdg.linen_conv_kernels(module, x) or, for Equinox, None.")
  if not callable(kernels):  # None is a spec leaf
    for path, spec in jax.tree_util.tree_flatten_with_path(
        kernels, is_leaf=is_spec_leaf)[0]:
      if not is_spec_leaf(spec):
        raise _spec_error(spec, path)


def warn_nothing_selected(updates: Any, kernels: Any) -> None:
  """Warns (NoKernelsSelectedWarning) when `updates` hold arrays."""
  arrays = [f"{format_path(p)} {x.shape}" for p, x in
            jax.tree_util.tree_leaves_with_path(updates) if hasattr(x, "shape")]
  if not arrays:  # nothing could have been transformed
    return
  what = ("kernels=None (the guess)" if kernels is None else
          f"kernels={getattr(kernels, '__name__', 'a callable')}"
          if callable(kernels) else "the kernels dict")
  more = ", ..." if len(arrays) > 2 else ""
  warnings.warn(
      f"channel_directed changed nothing: {what} selected none of the "
      f"{len(arrays)} arrays ({', '.join(arrays[:2])}{more}). Pass kernels="
      "linen_conv_kernels(module, x), nnx_conv_kernels(model) or a dict such "
      "as {'conv': {'w': True}} (OIHW: KernelSpec(output_axis=0, "
      "input_axis=1)).", NoKernelsSelectedWarning, stacklevel=3)
