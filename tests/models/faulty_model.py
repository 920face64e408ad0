"""A small dense classifier for the digits whose loss misbehaves at run time, for the
tests of failures and stops: ``make(fail_at=N)`` raises in the Nth call of the loss
(inside the jitted step, through ``jax.debug.callback``: nothing shows before it
runs), ``make(fail_rows=R)`` on a batch of R rows (an evaluation's);
``make(sleep_s=S)`` makes every step after the first take S seconds more."""

import sys
import time

import jax
import jax.numpy as jnp
import optax

import psfw


def make(fail_at=0, sleep_s=0.0, fail_rows=0):
    calls = [0]

    def hook(x, rows):
        calls[0] += 1
        if fail_rows and rows == fail_rows:
            raise RuntimeError(f"the loss failed on purpose on a batch of {rows} rows")
        if fail_at and calls[0] >= fail_at:
            raise RuntimeError(f"the loss failed on purpose at call {calls[0]}")
        if sleep_s and calls[0] > 1:
            print("the loss sleeps", file=sys.stderr, flush=True)  # the tests stop it now
            time.sleep(sleep_s)

    def init(key):
        return {"out": {"w": jax.random.normal(key, (64, 10)) * 0.1, "b": jnp.zeros(10)}}

    def loss(params, x, y):
        jax.debug.callback(hook, x[0, 0], x.shape[0])
        logits = x @ params["out"]["w"] + params["out"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return psfw.Model(init, loss, [{"name": "out", "type": "dense", "params": ["out/w", "out/b"]}])
