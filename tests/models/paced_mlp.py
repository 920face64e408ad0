"""The shipped MLP for the digits (64 inputs, 32 hidden units, 10 classes), each
training step at least ``step_s`` seconds long: a host callback waits inside the
jitted loss. The tests of groups that come and go pace a job with it, so that a kill
or a join falls mid-run however fast or busy the machine is."""

import time

import jax

import psfw


def make(step_s=0.02):
    model = psfw.mlp([64, 32, 10])

    def pause(rows):
        time.sleep(step_s)

    def loss(params, x, y):
        jax.debug.callback(pause, x.shape[0])
        return model.loss(params, x, y)

    return model._replace(loss=loss)
