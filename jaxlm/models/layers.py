"""Small building blocks shared by the model families, all logically annotated."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jaxlm.model_config import LoraConfig

Initializer = Callable[..., jax.Array]
INIT_STD = 0.02  # GPT-2's


def logical(init: Initializer, axes: tuple[str, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, axes)


def dense_init(axes: tuple[str, ...], scale: float = 1.0) -> Initializer:
    return logical(nn.initializers.normal(INIT_STD * scale), axes)


def layer_norm(
    eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str, use_bias: bool = True
) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=use_bias,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def rms_norm(eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str) -> nn.RMSNorm:
    """Llama's norm: no centring and no bias; statistics in fp32 whatever the dtype."""
    return nn.RMSNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        name=name,
    )


def make_norm(
    kind: str, eps: float, use_bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str
) -> nn.Module:
    """`kind` is ModelConfig.norm: layernorm or rmsnorm."""
    if kind == "rmsnorm":
        return rms_norm(eps, dtype, param_dtype, name)
    return layer_norm(eps, dtype, param_dtype, name, use_bias)


class EinsumDense(nn.Module):
    """A projection `einsum(equation, x, kernel) + bias` with named kernel axes.

    Flax's DenseGeneral initialises a flattened kernel, which can't carry per-axis
    logical names; this keeps the kernel in its true shape.

    With `lora` (rank > 0) naming this module in its targets, low-rank adapters
    `lora_a` (input dims x rank, PEFT's kaiming-uniform init) and `lora_b` (rank x
    output dims, zeros) add (alpha / rank) dropout(x) A B; their axes are the kernel's
    with `lora_rank` (never sharded) between the input and output dims.
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...] = ()
    init_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None
    deterministic: bool = True  # of the adapters' dropout

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            dense_init(self.kernel_axes, self.init_scale),
            self.kernel_shape,
            self.param_dtype,
        )
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_axes:
            n = len(self.bias_axes)
            bias_init = logical(nn.initializers.zeros, self.bias_axes)
            bias = self.param("bias", bias_init, self.kernel_shape[-n:], self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and self.lora.rank > 0 and self.name in self.lora.targets:
            y = y + self._adapter(x)
        return y

    def _adapter(self, x: jax.Array) -> jax.Array:
        """(alpha / rank) dropout(x) A B, A over the kernel's input (contracted) dims."""
        inputs, _, out = self.equation.partition("->")
        kernel_letters = inputs.split(",")[1]
        n_in = sum(letter not in out for letter in kernel_letters)
        rank = self.lora.rank
        in_shape, out_shape = self.kernel_shape[:n_in], self.kernel_shape[n_in:]
        in_axes, out_axes = self.kernel_axes[:n_in], self.kernel_axes[n_in:]
        # PEFT's A: kaiming_uniform(a=sqrt(5)) over fan_in = the input dims, i.e.
        # uniform(+-1/sqrt(fan_in)) = variance_scaling(1/3, fan_in, uniform).
        a_init = nn.initializers.variance_scaling(
            1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=n_in
        )
        lora_a = self.param(
            "lora_a", logical(a_init, (*in_axes, "lora_rank")), (*in_shape, rank), self.param_dtype
        )
        lora_b = self.param(
            "lora_b",
            logical(nn.initializers.zeros, ("lora_rank", *out_axes)),
            (rank, *out_shape),
            self.param_dtype,
        )
        x = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
        h = jnp.tensordot(x.astype(self.dtype), lora_a.astype(self.dtype), axes=n_in)
        h = jnp.tensordot(h, lora_b.astype(self.dtype), axes=1)
        return (self.lora.scale * h).astype(self.dtype)


class GeluMlp(nn.Module):
    """GPT-2's feed-forward: fc_in -> GELU -> fc_out."""

    ff_dim: int
    out_init_scale: float
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_bias: bool = True
    lora: LoraConfig | None = None  # adapters on the projections it targets

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kw |= dict(lora=self.lora, deterministic=self.deterministic)
        h = EinsumDense(
            "bld,df->blf",
            (d_model, self.ff_dim),
            ("embed", "mlp"),
            ("mlp",) if self.use_bias else (),
            name="fc_in",
            **kw,
        )(x_BLD)
        h = checkpoint_name(h, "mlpwi")
        h = nn.with_logical_constraint(self.activate(h), ("batch", "length", "mlp"))
        out = EinsumDense(
            "blf,fd->bld",
            (self.ff_dim, d_model),
            ("mlp", "embed"),
            ("embed",) if self.use_bias else (),
            self.out_init_scale,
            name="fc_out",
            **kw,
        )(h)
        out = checkpoint_name(out, "mlpwo")
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.gelu(h)


class ReluMlp(GeluMlp):
    """T5's feed-forward: GPT-2's two matrices with ReLU in between (and, in T5, no biases)."""

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.relu(h)


class SwiGluMlp(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)), a gated unit with three matrices."""

    ff_dim: int
    out_init_scale: float
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_bias: bool = False
    lora: LoraConfig | None = None  # adapters on the projections it targets

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kw |= dict(lora=self.lora, deterministic=self.deterministic)
        bias_in = ("mlp",) if self.use_bias else ()

        def project_in(name: str) -> jax.Array:
            h = EinsumDense(
                "bld,df->blf", (d_model, self.ff_dim), ("embed", "mlp"), bias_in, name=name, **kw
            )(x_BLD)
            return nn.with_logical_constraint(
                checkpoint_name(h, "mlpwi"), ("batch", "length", "mlp")
            )

        h = self.activate(project_in("gate")) * project_in("up")
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        out = EinsumDense(
            "blf,fd->bld",
            (self.ff_dim, d_model),
            ("mlp", "embed"),
            ("embed",) if self.use_bias else (),
            self.out_init_scale,
            name="down",
            **kw,
        )(h)
        out = checkpoint_name(out, "mlpwo")
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.silu(h)


class GeGluMlp(SwiGluMlp):
    """T5 v1.1's (flan-t5's) gated feed-forward: down(gelu(gate(x)) * up(x)), with the
    tanh GELU Hugging Face calls `gelu_new` (wi_0 = gate, wi_1 = up, wo = down)."""

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.gelu(h, approximate=True)


MLPS = {"gelu": GeluMlp, "swiglu": SwiGluMlp, "relu": ReluMlp, "geglu": GeGluMlp}
