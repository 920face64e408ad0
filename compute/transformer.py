"""A small decoder-only transformer language model (GPT-style, pre-norm).

Token embedding plus a learned position embedding, ``depth`` blocks of causal
multi-head self-attention and a ReLU feed-forward part, each behind a layer norm and
added back to the residual stream, a final layer norm, and the output logits from the
token embedding itself (tied weights). The loss is the next-token cross-entropy
averaged over the positions; the metrics are the token accuracy and the loss in
bits per token (on byte-level text: bits per byte). The prediction is the
distribution of the next token at every position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from psfw.compute.models import Layer, Model, Params


def _norm(width: int) -> dict[str, jax.Array]:
    return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def _layer_norm(p: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def transformer_lm(vocab: int, seq_len: int, width: int = 128, heads: int = 4, depth: int = 2, ff: int = 4) -> Model:
    """The model for rows of ``seq_len`` token ids below ``vocab`` whose labels are
    the next token at each position."""
    if width % heads:
        raise ValueError(f"width {width} must be a multiple of heads ({heads})")
    head_width = width // heads
    blocks = [f"block{i}" for i in range(depth)]

    def init(key: jax.Array) -> Params:
        keys = iter(jax.random.split(key, 2 + 4 * depth))
        params: dict = {
            "embed": jax.random.normal(next(keys), (vocab, width), jnp.float32) * 0.02,
            "position": jax.random.normal(next(keys), (seq_len, width), jnp.float32) * 0.02,
            "final_norm": _norm(width),
        }
        out_scale = 1 / math.sqrt(width * 2 * depth)  # the residual stream's sum stays of unit size
        for name in blocks:
            params[name] = {
                "attn_norm": _norm(width),
                "qkv": jax.random.normal(next(keys), (width, 3 * width), jnp.float32) / math.sqrt(width),
                "attn_out": jax.random.normal(next(keys), (width, width), jnp.float32) * out_scale,
                "ff_norm": _norm(width),
                "ff_in": jax.random.normal(next(keys), (width, ff * width), jnp.float32) / math.sqrt(width),
                "ff_in_bias": jnp.zeros((ff * width,), jnp.float32),
                "ff_out": jax.random.normal(next(keys), (ff * width, width), jnp.float32) * out_scale,
                "ff_out_bias": jnp.zeros((width,), jnp.float32),
            }
        return params

    def attention(p: dict, h: jax.Array) -> jax.Array:
        rows, length, _ = h.shape
        q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(rows, length, heads, head_width) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_width)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(rows, length, width)
        return mixed @ p["attn_out"]

    def apply(params: Params, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[1]
        h = params["embed"][tokens] + params["position"][:length]
        for name in blocks:
            p = params[name]
            h = h + attention(p, _layer_norm(p["attn_norm"], h))
            inner = jax.nn.relu(_layer_norm(p["ff_norm"], h) @ p["ff_in"] + p["ff_in_bias"])
            h = h + inner @ p["ff_out"] + p["ff_out_bias"]
        return _layer_norm(params["final_norm"], h) @ params["embed"].T

    def loss(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
        logits = apply(params, x)
        value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        accuracy = (jnp.argmax(logits, axis=-1) == y).mean()
        return value, {"accuracy": accuracy, "bits_per_token": value / math.log(2)}

    def predict(params: Params, x: jax.Array) -> jax.Array:
        # at each position, the distribution of the token that follows it
        return jax.nn.softmax(apply(params, x), axis=-1)

    layers: list[Layer] = [
        {"name": "tokens", "type": "input", "shape": [seq_len], "params": []},
        {"name": "embed", "type": "token_embedding", "units": width, "params": ["embed", "position"]},
    ]
    for name in blocks:
        keys = ("attn_norm/scale", "attn_norm/bias", "qkv", "attn_out")
        layers.append(
            {"name": f"{name}_attn", "type": "causal_self_attention", "params": [f"{name}/{k}" for k in keys]}
        )
        keys = ("ff_norm/scale", "ff_norm/bias", "ff_in", "ff_in_bias", "ff_out", "ff_out_bias")
        layers.append({"name": f"{name}_ff", "type": "feed_forward", "params": [f"{name}/{k}" for k in keys]})
    layers.append(
        {"name": "logits", "type": "tied_output", "params": ["final_norm/scale", "final_norm/bias"]},
    )
    layers.append({"name": "loss", "type": "softmax_cross_entropy", "params": []})
    return Model(init, loss, layers, predict=predict)
