"""Elementwise ops and fused unary activations (reference 4.3)."""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .opsupport import floats, output, require_device, same_device, write_output
from .tensor import Tensor
from .types import FLOAT_DTYPES, INT_DTYPES, UnaryOpType, UnaryWithParam

_NAMES = {
    "relu": UnaryOpType.RELU,
    "silu": UnaryOpType.SILU,
    "gelu": UnaryOpType.GELU,
    "sigmoid": UnaryOpType.SIGMOID,
    "tanh": UnaryOpType.TANH,
}


def as_unary(act) -> UnaryWithParam:
    """Accept a UnaryOpType, a (UnaryOpType, param) tuple, a UnaryWithParam or a name string."""
    if isinstance(act, UnaryWithParam):
        return act
    if isinstance(act, UnaryOpType):
        return UnaryWithParam(act)
    if isinstance(act, tuple) and len(act) == 2 and isinstance(act[0], UnaryOpType):
        return UnaryWithParam(act[0], float(act[1]))
    if isinstance(act, str) and act.lower() in _NAMES:
        return UnaryWithParam(_NAMES[act.lower()])
    raise TypeError(f"Unsupported activation {act!r}")


_SIMPLE = {
    UnaryOpType.EXP: torch.exp,
    UnaryOpType.LOG: torch.log,
    UnaryOpType.NEG: torch.neg,
    UnaryOpType.GTZ: lambda x: (x > 0).to(x.dtype),  # 1.0 where x > 0, else 0.0
    UnaryOpType.LTZ: lambda x: (x < 0).to(x.dtype),
    UnaryOpType.EQZ: lambda x: (x == 0).to(x.dtype),
    UnaryOpType.IDENTITY: lambda x: x,
}


def apply_unary(x: torch.Tensor, act) -> torch.Tensor:
    """Apply one activation in fp32. GELU with param 1.0 is the tanh approximation; the
    comparisons (GTZ, LTZ, EQZ) give 1.0 where true and 0.0 elsewhere, as ttnn's SFPU ops."""
    a = as_unary(act)
    if a.op_type in _SIMPLE:
        if a.param is not None:
            raise RuntimeError(f"{a.op_type.name} takes no parameter, got {a.param!r}")
        return _SIMPLE[a.op_type](x)
    if a.op_type == UnaryOpType.RELU:
        return torch.relu(x)
    if a.op_type == UnaryOpType.SILU:
        return torch.nn.functional.silu(x)
    if a.op_type == UnaryOpType.GELU:
        approx = "tanh" if a.param else "none"
        return torch.nn.functional.gelu(x, approximate=approx)
    if a.op_type == UnaryOpType.SIGMOID:
        return torch.sigmoid(x)
    if a.op_type == UnaryOpType.TANH:
        return torch.tanh(x)
    raise NotImplementedError(f"activation {a.op_type.name} is not emulated")


def _apply_all(x, acts):
    for a in acts or ():
        x = apply_unary(x, a)
    return x


def _operand(v, n: int):
    if isinstance(v, Tensor):
        require_device(v, "binary op")
        if v.dtype in INT_DTYPES:
            return [s for s in v.logical_shards()]
        return floats(v)
    return [torch.tensor(float(v))] * n


def _binary(name, fn, a, b, dtype, memory_config, output_tensor, activations, a_acts, b_acts):
    if not isinstance(a, Tensor):
        raise TypeError(f"{name}: input_tensor_a must be a Tensor")
    require_device(a, name)
    if isinstance(b, Tensor):
        same_device(name, a, b)
        if len(b.shape) > 5 or len(a.shape) > 5:
            raise RuntimeError(f"{name}: broadcasting is supported up to rank 5")
        if (a.dtype in INT_DTYPES) != (b.dtype in INT_DTYPES):
            raise RuntimeError(f"{name}: cannot mix integer and float inputs")
    n = a.num_shards()
    xs, ys = _operand(a, n), _operand(b, n)
    outs = []
    for x, y in zip(xs, ys):
        try:
            shape = torch.broadcast_shapes(x.shape, y.shape)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)} "
                               "do not broadcast") from e
        if a.dtype in FLOAT_DTYPES:
            outs.append(_apply_all(fn(_apply_all(x, a_acts), _apply_all(y, b_acts)), activations))
        else:
            outs.append(fn(x, y))
    set_cost(flops=math.prod(shape))
    if dtype is None and output_tensor is not None and output_tensor.layout == a.layout:
        dtype = output_tensor.dtype  # round once, to the destination's dtype
    out = output(a, outs, dtype=dtype, memory_config=memory_config, op=name)
    return write_output(out, output_tensor, name)


@op("add")
def add(input_tensor_a, input_tensor_b, *, fast_and_approximate_mode=True, dtype=None,
        memory_config=None, output_tensor=None, activations=None, input_tensor_a_activations=None,
        input_tensor_b_activations=None, sub_core_grids=None, sub_device_id=None):
    """ttnn.add: out = post_acts(pre_a(a) + pre_b(b)); numpy broadcasting; b may be a scalar."""
    return _binary("add", torch.add, input_tensor_a, input_tensor_b, dtype, memory_config,
                   output_tensor, activations, input_tensor_a_activations,
                   input_tensor_b_activations)


@op("subtract")
def subtract(input_tensor_a, input_tensor_b, *, fast_and_approximate_mode=True, dtype=None,
             memory_config=None, output_tensor=None, activations=None,
             input_tensor_a_activations=None, input_tensor_b_activations=None,
             sub_core_grids=None, sub_device_id=None):
    """ttnn.subtract: out = post_acts(pre_a(a) - pre_b(b))."""
    return _binary("subtract", torch.sub, input_tensor_a, input_tensor_b, dtype, memory_config,
                   output_tensor, activations, input_tensor_a_activations,
                   input_tensor_b_activations)


@op("multiply")
def multiply(input_tensor_a, input_tensor_b, *, fast_and_approximate_mode=False, dtype=None,
             memory_config=None, output_tensor=None, activations=None,
             input_tensor_a_activations=None, input_tensor_b_activations=None,
             sub_core_grids=None, sub_device_id=None):
    """ttnn.multiply / ttnn.mul: out = post_acts(pre_a(a) * pre_b(b)) (SwiGLU: pre_a=[SILU])."""
    return _binary("multiply", torch.mul, input_tensor_a, input_tensor_b, dtype, memory_config,
                   output_tensor, activations, input_tensor_a_activations,
                   input_tensor_b_activations)


mul = multiply
sub = subtract


@op("silu")
def silu(input_tensor, *, memory_config=None, output_tensor=None, sub_core_grids=None):
    """ttnn.silu."""
    require_device(input_tensor, "silu")
    vals = [torch.nn.functional.silu(x) for x in floats(input_tensor)]
    dtype = None
    if output_tensor is not None and output_tensor.layout == input_tensor.layout:
        dtype = output_tensor.dtype  # round once, to the destination's dtype
    out = output(input_tensor, vals, dtype=dtype, memory_config=memory_config, op="silu")
    return write_output(out, output_tensor, "silu")


@op("softmax")
def softmax(input_tensor, dim=-1, *, memory_config=None, compute_kernel_config=None,
            numeric_stable=True):
    """ttnn.softmax in fp32, rounded to the input dtype."""
    require_device(input_tensor, "softmax")
    vals = [torch.softmax(x, dim=dim) for x in floats(input_tensor)]
    set_cost(flops=5 * math.prod(input_tensor.shape))
    return output(input_tensor, vals, memory_config=memory_config, op="softmax")
