"""Which leaves of an updates tree are conv kernels, and along which axes."""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

Direction = Literal["output", "input", "spatial"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)


class KernelSpec(NamedTuple):
  """How one selected leaf is laid out: which axes are channels.

  Axes count in the leaf itself (negative ones from its end). The default is
  Flax's layout `(*spatial, in, out)`.

  Attributes:
    output_axis: the output-channel axis: -1 for Flax's `Conv`, `ConvLocal`
      and `ConvTranspose`; -2 for `ConvTranspose(transpose_kernel=True)`;
      0 for OIHW (Equinox, PyTorch) kernels.
    stacked_axes: how many leading axes stack layers (`nn.scan`, `nn.vmap`,
      `nnx.vmap`/`nnx.scan`, `eqx.filter_vmap`): they are neither channel nor
      spatial axes, and the channel axes may not be among them.
    input_axis: the input-channel axis, needed only by `direction="input"`
      and `"spatial"`. None means the other of the last two axes when
      `output_axis` is one of them (Flax's layouts), and is an error for
      those directions otherwise. `"spatial"` means every axis that is
      neither stacked nor a channel axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> optax_cdg.KernelSpec(output_axis=0, input_axis=1)  # OIHW
    KernelSpec(output_axis=0, stacked_axes=0, input_axis=1)
    >>> w = jnp.arange(8.0)[:, None, None, None] * jnp.ones((8, 4, 3, 3))
    >>> tx = optax_cdg.channel_directed(
    ...     1e-2, direction="input",
    ...     kernels={"w": optax_cdg.KernelSpec(output_axis=0, input_axis=1)})
    >>> out, _ = tx.update({"w": w}, tx.init({"w": w}))
    >>> bool(jnp.allclose(out["w"], w))  # constant along the input axis
    True
  """

  output_axis: int = -1
  stacked_axes: int = 0
  input_axis: int | None = None


class NoKernelsSelectedWarning(UserWarning):
  """Raised when `channel_directed` selects no leaf of an updates tree.

  The transform then returns the updates unchanged, which looks like
  success; this warning (issued once per trace, at trace time) says so.
  Silence it, or make it an error, with Python's warning filters.

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
    ...     print(str(e)[:48])
    channel_directed selected no leaf of the updates
  """


# A value in a `kernels` tree: None/False (leave alone), True (a Flax conv
# kernel), an int (its output axis) or a KernelSpec.
Spec = None | bool | int | KernelSpec


def is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(
      x, (bool, int, np.bool_, np.integer, KernelSpec))


def is_passthrough(x: Any) -> bool:
  """Leaves that Optax passes through untouched (None, masked nodes)."""
  return x is None or isinstance(x, optax.MaskedNode)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names along a key path, without the `.value` of an nnx Variable."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == "value"
  ):
    path = path[:-1]
  return tuple(_key_name(k) for k in path)


def format_path(path: Sequence[Any]) -> str:
  return "/".join(path_names(path)) or "<root>"


_ATTENTION_PARTS = frozenset({"query", "key", "value", "out"})
_GENERAL_MODULE = re.compile(
    r"^(DenseGeneral|LinearGeneral|Einsum|Fp8Einsum|MultiHeadDotProductAttention"
    r"|MultiHeadAttention|SelfAttention)(_\d+)?$"
)


def _looks_like_conv_kernel(path: Sequence[Any], leaf: Any) -> bool:
  names = path_names(path)
  if not names or names[-1] != "kernel":
    return False
  if not hasattr(leaf, "ndim") or leaf.ndim < 3:
    return False
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return False
  return not any(
      n in _ATTENTION_PARTS or _GENERAL_MODULE.match(n) for n in names[:-1]
  )


STATIC_ARGS_HINT = (
    "optax.inject_hyperparams treats every callable argument as a schedule "
    "and calls it with the step count: pass static_args=(\"kernels\",) to "
    "optax.inject_hyperparams."
)


def reject_step_count(tree: Any, who: str) -> None:
  """Raises a TypeError naming `static_args` when handed a step count.

  `optax.inject_hyperparams` calls every callable argument with the step
  count (a scalar integer array); a selection callable receiving one would
  otherwise select nothing and turn the transform into the identity.
  """
  if (isinstance(tree, (jax.Array, np.ndarray, np.integer))
      and np.ndim(tree) == 0 and jnp.issubdtype(tree.dtype, jnp.integer)):
    raise TypeError(
        f"{who} was called with {tree!r}, a scalar integer, instead of a "
        f"tree of updates. {STATIC_ARGS_HINT}"
    )


def _equinox():
  # A tree can only hold Equinox modules once equinox is imported: never
  # import it here.
  return sys.modules.get("equinox")


def _equinox_conv_spec(module: Any) -> Any:
  """The spec subtree of one Equinox conv: its weight (OIHW), nothing else."""
  weight = module.weight
  if (is_passthrough(weight) or not hasattr(weight, "ndim")
      or not jnp.issubdtype(weight.dtype, jnp.floating)):
    spec = False
  else:
    # (out, in // groups, *kernel_size) for Conv and ConvTranspose alike;
    # leading axes beyond those were stacked by filter_vmap.
    stacked = weight.ndim - (module.num_spatial_dims + 2)
    if stacked < 0:
      spec = False
    else:
      spec = KernelSpec(output_axis=stacked, stacked_axes=stacked,
                        input_axis=stacked + 1)

  def one(path, x):
    if is_passthrough(x):
      return x
    if len(path) == 1 and getattr(path[0], "name", None) == "weight":
      return spec
    return False

  return jax.tree_util.tree_map_with_path(one, module, is_leaf=is_passthrough)


def _equinox_specs(module: Any, eqx: Any) -> Any:
  """Inside an Equinox module only its convs are selected, by class."""
  convs = (eqx.nn.Conv, eqx.nn.ConvTranspose)
  return jax.tree.map(
      lambda x: x if is_passthrough(x) else (
          _equinox_conv_spec(x) if isinstance(x, convs) else False),
      module,
      is_leaf=lambda x: is_passthrough(x) or isinstance(x, convs))


def conv_kernels(tree: Any) -> Any:
  """Guesses which leaves are conv kernels, from the tree alone.

  Equinox modules in the tree carry their classes, so inside them the
  selection is exact: the `weight` of every `eqx.nn.Conv` and
  `eqx.nn.ConvTranspose` (their 1-D, 2-D and 3-D subclasses, grouped or not)
  is selected with its OIHW layout (`KernelSpec(output_axis=0,
  input_axis=1)`, shifted by any leading axes `eqx.filter_vmap` stacked), and
  nothing else in an Equinox module is (`Linear`, `MultiheadAttention`,
  norms, a field that happens to be named `kernel`).

  Elsewhere (Flax linen params, nnx states, plain dicts) the guess uses names
  and shapes: a leaf is selected when its name is `kernel`, it has at least 3
  dimensions, it is real floating point, and no part of its path is an
  attention sub-module (`query`, `key`, `value`, `out`) or a general dense
  module (`DenseGeneral`, `LinearGeneral`, `Einsum`,
  `MultiHeadDotProductAttention`, `MultiHeadAttention`, `SelfAttention`, with
  Flax's automatic `_N` suffix). Haiku's conv weights are named `w` and are
  not guessed: pass an explicit spec for them.

  Limits (use :func:`linen_conv_kernels` or :func:`nnx_conv_kernels` when they
  matter): a `DenseGeneral`/`LinearGeneral`/`Einsum` given a custom name has
  kernels that look exactly like conv kernels; Dense kernels stacked by
  `nn.scan` have 3 dimensions and are taken for 1-D convs; the output axis of
  `ConvTranspose(transpose_kernel=True)` is -2, not the -1 assumed here; a
  leading stacking axis of a scanned conv is taken for a spatial axis.

  Args:
    tree: a tree of parameters or updates (nnx states of Variables and
      Equinox models work too).

  Returns:
    A tree of the same structure with `True` (or, in an Equinox conv, a
    :class:`KernelSpec`) at each selected leaf and `False` elsewhere (None
    and masked leaves stay as they are).

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
  eqx = _equinox()

  def is_leaf(x):
    return is_passthrough(x) or (eqx is not None and isinstance(x, eqx.Module))

  def one(path, x):
    if is_passthrough(x):
      return x
    if eqx is not None and isinstance(x, eqx.Module):
      return _equinox_specs(x, eqx)
    return _looks_like_conv_kernel(path, x)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_leaf)


class PathSelection:
  """A `kernels=` callable selecting the kernels recorded from a model.

  Matches leaves by their path (the `.value` of nnx Variables ignored), so the
  same selection serves `nnx.State` of Variables, pure states and plain dicts.
  """

  def __init__(
      self, specs: dict[tuple[str, ...], tuple[KernelSpec, tuple[int, ...]]],
      source: str,
  ):
    self.specs = dict(specs)
    self.source = source

  def __repr__(self) -> str:
    paths = ", ".join("/".join(p) for p in self.specs)
    return f"{type(self).__name__}({self.source}: {paths})"

  def __call__(self, updates: Any) -> Any:
    reject_step_count(updates, f"the selection of the {self.source}")
    seen: set[tuple[str, ...]] = set()

    def select(path, leaf):
      names = path_names(path)
      if names not in self.specs:
        return None if is_passthrough(leaf) else False
      seen.add(names)
      spec, shape = self.specs[names]
      if not is_passthrough(leaf) and tuple(leaf.shape) != shape:
        raise ValueError(
            f"kernels: the {self.source} recorded {'/'.join(names)} with shape "
            f"{shape}, but the updates hold shape {tuple(leaf.shape)} there."
        )
      return spec

    out = jax.tree_util.tree_map_with_path(
        select, updates, is_leaf=is_passthrough
    )
    if self.specs and not seen:
      got = [format_path(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(updates)[0][:3]]
      want = ["/".join(p) for p in list(self.specs)[:3]]
      raise ValueError(
          f"kernels: none of the {len(self.specs)} conv kernels recorded from "
          f"the {self.source} is in the updates tree (recorded paths such as "
          f"{want}; update paths such as {got}). Pass the parameters tree "
          "itself, as `module.init(...)['params']` or `nnx.state(model, "
          "nnx.Param)`."
      )
    return out


def _linen_types():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return (nn.Conv, nn.ConvLocal, nn.ConvTranspose)


def linen_conv_kernels(module: Any, *example_args: Any,
                       **example_kwargs: Any) -> PathSelection:
  """Selects exactly the conv kernels of a Flax linen module.

  Runs `module.init` abstractly (`jax.eval_shape`, nothing is computed) with
  every method call intercepted (`nn.intercept_methods`), and records each
  `nn.Conv`, `nn.ConvLocal` and `nn.ConvTranspose` (subclasses included) that
  is called, with its output axis (-2 for `transpose_kernel=True`) and the
  number of leading axes that `nn.scan`/`nn.vmap` stacked onto its kernel.

  Args:
    module: a linen module.
    *example_args: example inputs for `module.init` (arrays or
      `jax.ShapeDtypeStruct` values).
    **example_kwargs: static keyword arguments for `module.init` (for example
      `train=False`).

  Returns:
    A value for `channel_directed(kernels=...)`: a callable that selects the
    recorded kernels in `module.init(rng, *example_args,
    **example_kwargs)["params"]`, by path. Through `optax.inject_hyperparams`
    it needs `static_args=("kernels",)`.

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
    KernelSpec(output_axis=-1, stacked_axes=0, input_axis=None)
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if not isinstance(module, nn.Module):
    raise TypeError(
        f"module must be a flax.linen.Module; got {type(module).__name__}."
    )
  conv_types = _linen_types()
  found: dict[tuple[str, ...], tuple[int, tuple[int, ...]]] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    m = context.module
    if context.method_name == "__call__" and isinstance(m, conv_types):
      kernel = m.get_variable("params", "kernel")
      if kernel is not None:
        out_axis = -2 if getattr(m, "transpose_kernel", False) else -1
        found[tuple(m.path) + ("kernel",)] = (out_axis, tuple(kernel.shape))
    return out

  key = jax.random.key(0)
  init = functools.partial(module.init, **example_kwargs)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(init, {"params": key, "dropout": key},
                               *example_args)
  params = variables.get("params", {})
  specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    if names in found:
      out_axis, inner = found[names]
      specs[names] = (_stacked_spec(names, leaf.shape, inner, out_axis),
                      tuple(leaf.shape))
  return PathSelection(specs, f"linen module {type(module).__name__}")


def _stacked_spec(names, shape, inner, out_axis) -> KernelSpec:
  stacked = len(shape) - len(inner)
  if stacked < 0 or tuple(shape[stacked:]) != tuple(inner):
    raise ValueError(
        f"kernels: cannot place the kernel {'/'.join(names)} of per-layer "
        f"shape {tuple(inner)} in its parameter of shape {tuple(shape)}: only "
        "stacking along leading axes is supported."
    )
  return KernelSpec(output_axis=out_axis, stacked_axes=stacked)


def nnx_conv_kernels(model: Any) -> PathSelection:
  """Selects exactly the conv kernels of a Flax nnx model.

  Walks the model's modules (`nnx.iter_modules`) and records the `kernel` of
  every `nnx.Conv` and `nnx.ConvTranspose` (subclasses included), with its
  output axis (-2 for `transpose_kernel=True`) and the number of leading axes
  that `nnx.vmap`/`nnx.scan` stacked onto it.

  Args:
    model: an `nnx.Module`.

  Returns:
    A value for `channel_directed(kernels=...)`: a callable that selects those
    kernels by path, in `nnx.state(model, nnx.Param)` whether it holds
    Variables (as `nnx.Optimizer.init` passes it) or pure arrays (as its
    `update` does). Through `optax.inject_hyperparams` it needs
    `static_args=("kernels",)`.

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
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"model must be a flax.nnx.Module; got {type(model).__name__}."
    )
  conv_types = tuple(
      t for t in (getattr(nnx, "Conv", None), getattr(nnx, "ConvTranspose", None),
                  getattr(nnx, "ConvLocal", None)) if t is not None
  )
  specs = {}
  for path, m in nnx.iter_modules(model):
    if not isinstance(m, conv_types):
      continue
    kernel = getattr(m, "kernel", None)
    if kernel is None:
      continue
    shape = tuple(jnp.shape(kernel))
    inner = tuple(m.kernel_shape)
    names = tuple(str(p) for p in path) + ("kernel",)
    out_axis = -2 if getattr(m, "transpose_kernel", False) else -1
    specs[names] = (_stacked_spec(names, shape, inner, out_axis), shape)
  return PathSelection(specs, f"nnx model {type(model).__name__}")


def _axis(value: Any, name: str, where: str, shape: tuple[int, ...]) -> int:
  """A normalized axis of a leaf of `shape`, or a clear ValueError."""
  ndim = len(shape)
  if isinstance(value, np.integer):  # np.int64 from array code counts
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or not (
      -ndim <= value < ndim):
    raise ValueError(
        f"kernels: the {name} {value!r} at {where} (shape {shape}) is not an "
        f"axis of it: allowed -{ndim} .. {ndim - 1}."
    )
  return value % ndim


def resolve_spec(
    spec: Spec, path: Sequence[Any], leaf: Any, direction: str
) -> tuple[int, ...] | None:
  """The axes a spec value selects on a leaf, or None if it is not selected.

  Raises a clear error for a spec value, leaf or direction that do not fit.
  """
  if isinstance(spec, np.bool_):
    spec = bool(spec)
  if spec is None or spec is False:
    return None
  where = format_path(path)
  if spec is True:
    spec = KernelSpec()
  elif isinstance(spec, (int, np.integer)):
    spec = KernelSpec(output_axis=int(spec))
  elif not isinstance(spec, KernelSpec):
    raise TypeError(
        f"kernels: the value at {where} is {spec!r}; expected None, False, "
        "True, an output axis (int) or an optax_cdg.KernelSpec."
        + (f" {STATIC_ARGS_HINT}" if hasattr(spec, "dtype") else "")
    )
  if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype,
                                                      jnp.floating):
    what = (f"has dtype {leaf.dtype}" if hasattr(leaf, "dtype") else
            f"is a {type(leaf).__name__}, not an array")
    raise TypeError(
        f"kernels selects {where}, which {what}; only real floating-point "
        "arrays can be transformed."
    )
  shape = tuple(leaf.shape)
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"kernels selects {where} of shape {shape}; a selected leaf needs at "
        "least 2 dimensions (input and output channels)."
    )
  stacked = spec.stacked_axes
  if isinstance(stacked, np.integer):
    stacked = int(stacked)
  if isinstance(stacked, bool) or not isinstance(stacked, int) or not (
      0 <= stacked <= ndim - 2):
    raise ValueError(
        f"kernels: stacked_axes={stacked!r} at {where} (shape {shape}) must "
        f"be an int in 0 .. {ndim - 2}."
    )
  out = _axis(spec.output_axis, "output axis", where, shape)
  if spec.input_axis is not None:
    inp = _axis(spec.input_axis, "input axis", where, shape)
  elif out >= ndim - 2:  # Flax layouts: the other of the last two axes.
    inp = (2 * ndim - 3) - out
  else:
    inp = None
  for name, axis in (("output", out), ("input", inp)):
    if axis is not None and axis < stacked:
      raise ValueError(
          f"kernels: the {name} axis {axis} at {where} (shape {shape}) is "
          f"one of its {stacked} stacked (layer) axes."
      )
  if inp == out:
    raise ValueError(
        f"kernels: the input axis at {where} (shape {shape}) is its output "
        f"axis {out}; they must differ."
    )
  if direction == "output":
    return (out,)
  if inp is None:
    raise ValueError(
        f"direction={direction!r} needs the input-channel axis, but the "
        f"spec at {where} (shape {shape}) names output_axis={out}, not one of "
        "the last two axes, and no input_axis: pass "
        f"KernelSpec(output_axis={out}, input_axis=...), for OIHW kernels "
        f"input_axis={out + 1}."
    )
  if direction == "input":
    return (inp,)
  spatial = tuple(a for a in range(stacked, ndim) if a not in (out, inp))
  if not spatial:
    raise ValueError(
        f"direction='spatial' needs spatial axes, but the kernel at {where} "
        f"has shape {shape} with {stacked} stacked axes and none besides its "
        "two channel axes."
    )
  return spatial


def map_selected(
    fn: Callable[[jax.Array, tuple[int, ...]], Any],
    updates: Any,
    spec_tree: Any,
    direction: str,
) -> Any:
  """Applies `fn(leaf, axes)` to every leaf a `kernels` spec tree selects.

  `spec_tree` is a prefix of `updates`; every other leaf is returned as the
  very same object.
  """
  specs, treedef = jax.tree_util.tree_flatten_with_path(
      spec_tree, is_leaf=is_spec_leaf
  )
  try:
    subtrees = treedef.flatten_up_to(updates)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "kernels: the spec tree must be a prefix of the updates tree (same "
        "containers and keys, with None/False/True/axis values at or above "
        f"the leaves); they differ: {e}"
    ) from e

  out = []
  for (path, spec), sub in zip(specs, subtrees):
    if spec is None or (isinstance(spec, (bool, np.bool_)) and not spec):
      out.append(sub)
      continue

    def one(p, x, path=path, spec=spec):
      if is_passthrough(x):
        return x
      return fn(x, resolve_spec(spec, path + p, x, direction))

    out.append(jax.tree_util.tree_map_with_path(one, sub,
                                                is_leaf=is_passthrough))
  return treedef.unflatten(out)


def resolve_kernels(kernels: Any, updates: Any) -> Any:
  """The spec tree for `updates` from a `kernels` argument."""
  if kernels is None:
    return conv_kernels(updates)
  if callable(kernels):
    return kernels(updates)
  return kernels


def _model_hint(kernels: Any) -> str | None:
  """How to select a model's kernels, if `kernels` is a model."""
  nnx = getattr(sys.modules.get("flax"), "nnx", None)
  linen = getattr(sys.modules.get("flax"), "linen", None)
  eqx = _equinox()
  if nnx is not None and isinstance(kernels, nnx.Module):
    return "kernels=optax_cdg.nnx_conv_kernels(model)"
  if linen is not None and isinstance(kernels, linen.Module):
    return ("kernels=optax_cdg.linen_conv_kernels(module, x), with x an "
            "example input")
  if eqx is not None and isinstance(kernels, eqx.Module):
    return ("kernels=None, which selects the weight of every Equinox Conv "
            "and ConvTranspose exactly")
  return None


def check_kernels(kernels: Any) -> None:
  """Build-time check of a `kernels` argument."""
  hint = _model_hint(kernels)
  if hint is not None:
    raise TypeError(
        f"kernels={type(kernels).__name__}(...) is a model, not a selection "
        f"of its conv kernels: pass {hint}.")
  if kernels is None or callable(kernels):
    return
  for path, spec in jax.tree_util.tree_flatten_with_path(
      kernels, is_leaf=is_spec_leaf)[0]:
    if is_spec_leaf(spec):
      continue
    where = format_path(path)
    if hasattr(spec, "dtype") and np.ndim(spec) == 0:
      # What a callable `kernels` returns for the step count that
      # optax.inject_hyperparams hands it.
      hint = f" {STATIC_ARGS_HINT}"
    elif hasattr(spec, "shape"):
      hint = (" It looks like a parameter or gradient array: pass a "
              "selection, such as optax_cdg.conv_kernels(params), or leave "
              "kernels=None.")
    else:
      hint = ""
    raise TypeError(
        f"kernels: the value at {where} is "
        f"{_short(spec)}; expected None, False, True, an output axis (int) or "
        f"an optax_cdg.KernelSpec (or pass a callable or None).{hint}")


def _short(x: Any) -> str:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
  return repr(x)


def _describe_kernels(kernels: Any) -> str:
  if kernels is None:
    return "kernels=None (the optax_cdg.conv_kernels guess)"
  if callable(kernels):
    return f"kernels={kernels!r} (called on the updates)"
  return "the kernels tree"


def warn_nothing_selected(updates: Any, kernels: Any) -> None:
  """Warns (NoKernelsSelectedWarning) when `updates` hold arrays."""
  arrays = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(
      updates, is_leaf=is_passthrough)[0]
            if not is_passthrough(x) and hasattr(x, "shape")]
  if not arrays:  # nothing that could have been transformed
    return
  seen = ", ".join(f"{format_path(p)} {tuple(x.shape)}"
                   for p, x in arrays[:4])
  more = f" and {len(arrays) - 4} more" if len(arrays) > 4 else ""
  warnings.warn(
      "channel_directed selected no leaf of the updates, so it returns them "
      f"unchanged: {_describe_kernels(kernels)} selected none of its "
      f"{len(arrays)} arrays ({seen}{more}). kernels=None finds Flax conv "
      "kernels (leaves named 'kernel' with 3 or more dimensions) and the "
      "weights of Equinox Conv/ConvTranspose modules. Otherwise pass "
      "kernels=optax_cdg.linen_conv_kernels(module, x), "
      "optax_cdg.nnx_conv_kernels(model), or an explicit spec tree such as "
      "{'conv': {'w': True}} (Haiku, HWIO) or "
      "{'conv': optax_cdg.KernelSpec(output_axis=0, input_axis=1)} (OIHW). "
      "A callable kernels given to optax.inject_hyperparams needs "
      "static_args=(\"kernels\",). Silence this warning with "
      "warnings.filterwarnings('ignore', "
      "category=optax_cdg.NoKernelsSelectedWarning), or make it an error "
      "with 'error'.",
      NoKernelsSelectedWarning,
      stacklevel=_user_stacklevel(),
  )


# Frames in these packages are not the user's code.
_LIBRARY_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep for m in (jax, optax, np)
) + (os.path.dirname(__file__) + os.sep,)


def _user_stacklevel() -> int:
  """The `stacklevel` of the innermost frame outside the libraries.

  So that the warning names the user's line (a train step calling
  `tx.update`), not `optax/_src/_combining.py`. Flax's and Equinox's
  wrappers count as libraries when they are imported.
  """
  dirs = _LIBRARY_DIRS + tuple(
      os.path.dirname(m.__file__) + os.sep
      for m in (sys.modules.get("flax"), _equinox()) if m is not None)
  # Frame 2 is the caller of warn_nothing_selected, stacklevel 2 for it.
  frame, level = sys._getframe(2), 2  # pylint: disable=protected-access
  while frame is not None and frame.f_code.co_filename.startswith(dirs):
    frame, level = frame.f_back, level + 1
  return level if frame is not None else 2
