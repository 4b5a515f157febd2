"""Which leaves of an updates tree are conv kernels, and along which axes."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

DIRECTIONS = ("output", "input", "spatial")


class KernelSpec(NamedTuple):
  """How one selected leaf is laid out.

  Attributes:
    output_axis: the output-channel axis, one of the last two (-1 for Flax's
      `Conv`, `ConvLocal` and `ConvTranspose`; -2 for
      `ConvTranspose(transpose_kernel=True)`). The input-channel axis is the
      other of the last two.
    stacked_axes: how many leading axes stack layers (`nn.scan`, `nn.vmap`,
      `nnx.vmap`/`nnx.scan`): they are neither channel nor spatial axes.
  """

  output_axis: int = -1
  stacked_axes: int = 0


# A value in a `kernels` tree: None/False (leave alone), True (a Flax conv
# kernel), an int (its output axis) or a KernelSpec.
Spec = None | bool | int | KernelSpec
KernelsArg = Any | Callable[[Any], Any] | None


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


def conv_kernels(tree: Any) -> Any:
  """Guesses, from names and shapes alone, which leaves are Flax conv kernels.

  A leaf is selected when its name is `kernel`, it has at least 3 dimensions,
  it is real floating point, and no part of its path is an attention
  sub-module (`query`, `key`, `value`, `out`) or a general dense module
  (`DenseGeneral`, `LinearGeneral`, `Einsum`, `MultiHeadDotProductAttention`,
  `MultiHeadAttention`, `SelfAttention`, with Flax's automatic `_N` suffix).

  Limits (use :func:`linen_conv_kernels` or :func:`nnx_conv_kernels` when they
  matter): a `DenseGeneral`/`LinearGeneral`/`Einsum` given a custom name has
  kernels that look exactly like conv kernels; Dense kernels stacked by
  `nn.scan` have 3 dimensions and are taken for 1-D convs; the output axis of
  `ConvTranspose(transpose_kernel=True)` is -2, not the -1 assumed here; a
  leading stacking axis of a scanned conv is taken for a spatial axis.

  Args:
    tree: a tree of parameters or updates (nnx states of Variables work too).

  Returns:
    A tree of the same structure with `True` at each selected leaf and `False`
    elsewhere (None and masked leaves stay as they are).
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if is_passthrough(x) else _looks_like_conv_kernel(p, x),
      tree,
      is_leaf=is_passthrough,
  )


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
      `jax.ShapeDtypeStruct`s).
    **example_kwargs: static keyword arguments for `module.init` (for example
      `train=False`).

  Returns:
    A value for `channel_directed(kernels=...)`: a callable that selects the
    recorded kernels in `module.init(rng, *example_args,
    **example_kwargs)["params"]`, by path.
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
    `update` does).
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
    )
  if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype,
                                                      jnp.floating):
    what = (f"has dtype {leaf.dtype}" if hasattr(leaf, "dtype") else
            f"is a {type(leaf).__name__}, not an array")
    raise TypeError(
        f"kernels selects {where}, which {what}; only real floating-point "
        "arrays can be transformed."
    )
  ndim = leaf.ndim
  if ndim < 2:
    raise ValueError(
        f"kernels selects {where} of shape {tuple(leaf.shape)}; a selected "
        "leaf needs at least 2 dimensions (input and output channels)."
    )
  # numpy integers (np.int64 from array code) count as ints.
  out, stacked = (int(v) if isinstance(v, np.integer) else v
                  for v in (spec.output_axis, spec.stacked_axes))
  if isinstance(out, bool) or not isinstance(out, int) or out not in (
      -1, -2, ndim - 1, ndim - 2):
    raise ValueError(
        f"kernels: the output axis {out!r} at {where} (shape "
        f"{tuple(leaf.shape)}) must be one of the last two axes: -1 or -2."
    )
  if isinstance(stacked, bool) or not isinstance(stacked, int) or not (
      0 <= stacked <= ndim - 2):
    raise ValueError(
        f"kernels: stacked_axes={stacked!r} at {where} (shape "
        f"{tuple(leaf.shape)}) must be an int in 0 .. {ndim - 2}."
    )
  out %= ndim
  if direction == "output":
    return (out,)
  if direction == "input":
    return ((2 * ndim - 3) - out,)
  spatial = tuple(range(stacked, ndim - 2))
  if not spatial:
    raise ValueError(
        f"direction='spatial' needs spatial axes, but the kernel at {where} "
        f"has shape {tuple(leaf.shape)} with {stacked} stacked axes and none "
        "before its two channel axes."
    )
  return spatial
