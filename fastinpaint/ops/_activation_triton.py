"""The activations of ``_activation.py`` as Triton device functions, shared by every
op's ``triton.py`` (codes: 0 none, 1 relu, 2 leaky_relu(negative_slope), 3 elu with
alpha 1; math in float32). Imported only by Triton kernel modules: it needs triton."""

import triton
import triton.language as tl


@triton.jit
def sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def act(f, negative_slope, ACT: tl.constexpr):
    if ACT == 1:
        f = tl.where(f > 0.0, f, 0.0)
    elif ACT == 2:
        f = tl.where(f > 0.0, f, f * negative_slope)
    elif ACT == 3:
        f = tl.where(f > 0.0, f, tl.exp(tl.minimum(f, 0.0)) - 1.0)
    return f


@triton.jit
def act_and_grad(f, negative_slope, ACT: tl.constexpr):
    """(act(f), act'(f))."""
    if ACT == 1:
        pos = f > 0.0
        a = tl.where(pos, f, 0.0)
        da = tl.where(pos, 1.0, 0.0)
    elif ACT == 2:
        pos = f > 0.0
        a = tl.where(pos, f, f * negative_slope)
        da = tl.where(pos, 1.0, negative_slope)
    elif ACT == 3:
        pos = f > 0.0
        e = tl.exp(tl.minimum(f, 0.0))
        a = tl.where(pos, f, e - 1.0)
        da = tl.where(pos, 1.0, e)
    else:
        a = f
        da = tl.full(f.shape, 1.0, tl.float32)
    return a, da


@triton.jit
def grad_from_output(y, negative_slope, ACT: tl.constexpr):
    """act'(pre) from y = act(pre): y > 0 <=> pre > 0 (slope >= 0); elu: exp(pre) = y + 1."""
    if ACT == 1:
        g = tl.where(y > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(y > 0.0, 1.0, negative_slope)
    elif ACT == 3:
        g = tl.where(y > 0.0, 1.0, y + 1.0)
    else:
        g = tl.full(y.shape, 1.0, tl.float32)
    return g
