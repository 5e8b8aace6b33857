"""Recurrent-layer ATen ops: lstm, gru, rnn_tanh and rnn_relu.

A stacked (bi)directional network runs as torch runs it, one `lax.scan` per
layer and direction; dropout between layers draws from `ctx.key()`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _lstm_cell(weights, has_biases):
    w_ih, w_hh, b_ih, b_hh, w_hr = _unpack_cell(weights, has_biases, projected=len(weights) in (3, 5))

    def project(x):
        return _linear_nobias(x, w_ih, b_ih)

    def step(carry, gates_x):
        h, c = carry
        gates = gates_x + _linear_nobias(h, w_hh, b_hh)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.T
        return (h, c), h

    return project, step


def _gru_cell(weights, has_biases):
    w_ih, w_hh, b_ih, b_hh, _ = _unpack_cell(weights, has_biases, projected=False)

    def project(x):
        return _linear_nobias(x, w_ih, b_ih)

    def step(h, gates_x):
        gates_h = _linear_nobias(h, w_hh, b_hh)
        xr, xz, xn = jnp.split(gates_x, 3, axis=-1)
        hr, hz, hn = jnp.split(gates_h, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return h, h

    return project, step


def _rnn_cell(nonlinearity):
    def cell(weights, has_biases):
        w_ih, w_hh, b_ih, b_hh, _ = _unpack_cell(weights, has_biases, projected=False)

        def project(x):
            return _linear_nobias(x, w_ih, b_ih)

        def step(h, gates_x):
            h = nonlinearity(gates_x + _linear_nobias(h, w_hh, b_hh))
            return h, h

        return project, step

    return cell


def _unpack_cell(weights, has_biases, projected):
    weights = list(weights)
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    w_hr = weights[-1] if projected else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _linear_nobias(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _run_rnn(ctx, make_cell, x, hidden, params, has_biases, num_layers, dropout_p, train, bidirectional, batch_first):
    """A stacked (bi)directional RNN as torch runs it, one lax.scan per layer and direction.

    `hidden` is a list of initial states, each shaped (layers * directions, batch, size).
    Returns the output sequence and the final states, stacked like `hidden`.
    """
    directions = 2 if bidirectional else 1
    per_cell = len(params) // (num_layers * directions)
    if batch_first:
        x = jnp.swapaxes(x, 0, 1)
    finals = [[] for _ in hidden]
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            cell = layer * directions + direction
            weights = params[cell * per_cell : (cell + 1) * per_cell]
            project, step = make_cell(weights, has_biases)
            init = tuple(h[cell] for h in hidden)
            carry, ys = lax.scan(step, init if len(init) > 1 else init[0], project(x), reverse=direction == 1)
            for k, c in enumerate(carry if len(init) > 1 else (carry,)):
                finals[k].append(c)
            outputs.append(ys)
        x = outputs[0] if directions == 1 else jnp.concatenate(outputs, axis=-1)
        if train and dropout_p > 0 and layer < num_layers - 1:
            keep = jax.random.bernoulli(jax.random.fold_in(ctx.key(), layer), 1.0 - dropout_p, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout_p), 0)
    if batch_first:
        x = jnp.swapaxes(x, 0, 1)
    return (x.astype(ctx.dtype_of(0)),) + tuple(
        jnp.stack(f).astype(ctx.dtype_of(k + 1)) for k, f in enumerate(finals)
    )


@lowering(aten.lstm.input)
def lstm(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _run_rnn(ctx, _lstm_cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@lowering(aten.gru.input)
def gru(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _run_rnn(ctx, _gru_cell, x, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@lowering(aten.rnn_tanh.input)
def rnn_tanh(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    cell = _rnn_cell(jnp.tanh)
    return _run_rnn(ctx, cell, x, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@lowering(aten.rnn_relu.input)
def rnn_relu(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    cell = _rnn_cell(jax.nn.relu)
    return _run_rnn(ctx, cell, x, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
