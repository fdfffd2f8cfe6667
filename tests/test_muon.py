"""Muon (k2jax/optim/muon.py): Newton-Schulz, stacked matrices, RMS matching, bfloat16, against optax."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from param_trees import k2_tree

from k2jax.config import OptimConfig
from k2jax.optim.muon import muon_or_adamw
from k2jax.params import ParamInfo

NS = dict(ns_steps=5, ns_coeffs=(3.4445, -4.7750, 2.0315))


def _orthogonalise(g):
    """Newton-Schulz of one matrix via optax's scale_by_muon with no momentum (beta=0)."""
    tx = scale_by_muon(beta=0.0, nesterov=False, **NS)
    out, _ = tx.update(g, tx.init(g))
    return out


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (128, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_newton_schulz_singular_values_in_quintic_band(shape, seed):
    """Rectangular Gaussian matrices (spectrum away from 0): five steps of the (3.4445, -4.7750,
    2.0315) quintic leave every singular value in its known band of roughly [0.68, 1.2]
    (it trades exact orthogonality for speed)."""
    g = jax.random.normal(jax.random.key(seed), shape)
    s = np.linalg.svd(np.asarray(_orthogonalise(g)), compute_uv=False)
    s_in = np.linalg.svd(np.asarray(g), compute_uv=False)
    assert s_in.max() / s_in.min() > 1.5  # the input is far from orthogonal
    assert 0.67 < s.min() and s.max() < 1.2, (s.min(), s.max())


def _one_muon_step(grad_seed):
    """Updates of one momentum-free Muon step at learning rate 1 (no decay), and the gradients."""
    params, infos = k2_tree()
    grads, _ = k2_tree(grad_seed)
    tx = muon_or_adamw(1.0, infos, OptimConfig(weight_decay=0.0, momentum=0.0, nesterov=False, rms_scale=0.2))
    return tx.update(grads, tx.init(params), params)[0], grads


def test_stacked_matrices_are_orthogonalised_one_by_one():
    updates, grads = _one_muon_step(1)
    for name in ("experts", "layers_w"):
        for i in range(grads[name].shape[0]):
            a, b = grads[name][i].shape
            expected = -_orthogonalise(grads[name][i]) * 0.2 * np.sqrt(max(a, b))
            np.testing.assert_allclose(updates[name][i], expected, rtol=2e-3, atol=2e-4)


def test_newton_schulz_flop_count_matches_xla_cost_analysis():
    """Our closed form against XLA's own count for optax's Newton-Schulz on a stacked (4, 96, 40)
    parameter (fan-in 96 -> transposed to the wide orientation) and a (48, 80) one."""
    from k2jax.optim.muon import newton_schulz_flops

    infos = {"stack": ParamInfo(axes=("layers", "embed", "mlp"), kind="matrix", in_axes=("embed",)),
             "wide": ParamInfo(axes=("embed", "mlp"), kind="matrix", in_axes=("embed",)),
             "norm": ParamInfo(axes=("norm",), kind="norm")}
    params = {"stack": jnp.ones((4, 96, 40)), "wide": jnp.ones((48, 80)), "norm": jnp.ones((80,))}
    dims = {"stack": MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,)),
            "wide": MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1,))}
    tx = scale_by_muon(beta=0.0, nesterov=False, weight_dimension_numbers=dims, **NS)
    matrices = {k: params[k] for k in dims}  # the norm is AdamW's: not counted
    counted = jax.jit(lambda g: tx.update(g, tx.init(g))[0]).lower(matrices).compile().cost_analysis()
    counted = counted[0] if isinstance(counted, list) else counted
    expected = newton_schulz_flops(infos, params)
    assert expected == pytest.approx(5 * (4 * (4 * 40**2 * 96 + 2 * 40**3) + 4 * 48**2 * 80 + 2 * 48**3))
    # XLA also counts the elementwise work (normalisation, a*X + B*X): a few percent on top
    assert expected <= counted["flops"] <= 1.1 * expected, (expected, counted["flops"])


def test_update_rms_matches_adamw_scale():
    """An orthogonal A x B matrix has RMS 1/sqrt(max(A, B)); scaled by 0.2*sqrt(max(A, B)) the
    update RMS is 0.2 * (RMS of the Newton-Schulz output * sqrt(max)), i.e. ~0.2."""
    updates, grads = _one_muon_step(2)
    for name in ("experts", "layers_w"):
        for i in range(grads[name].shape[0]):
            o = np.asarray(_orthogonalise(grads[name][i]))
            a, b = o.shape
            expected = 0.2 * np.sqrt(max(a, b)) * np.sqrt(np.mean(o**2))
            np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(updates[name][i]) ** 2)), expected, rtol=1e-3)
            assert 0.15 < expected < 0.25


def test_bfloat16_newton_schulz_runs_in_bfloat16_and_stays_close():
    """ns_dtype="bfloat16" (how K2 ran it): the iterations' matrix products are bfloat16 in the
    program; each expert's and layer's update differs from the float32 one by bfloat16 rounding
    carried through 15 products (4-6% here), while its singular values stay in the quintic's band
    (what orthogonalising is for); the AdamW branch is untouched."""
    params, infos = k2_tree()
    grads, _ = k2_tree(3)

    def muon(ns_dtype):
        return muon_or_adamw(1.0, infos, OptimConfig(weight_decay=0.0, momentum=0.0, nesterov=False, ns_dtype=ns_dtype))

    tx16, tx32 = muon("bfloat16"), muon("float32")
    u16 = tx16.update(grads, tx16.init(params), params)[0]
    u32 = tx32.update(grads, tx32.init(params), params)[0]
    for name in ("experts", "layers_w"):
        assert u16[name].dtype == jnp.float32
        for i in range(grads[name].shape[0]):
            rel = np.linalg.norm(u16[name][i] - u32[name][i]) / np.linalg.norm(u32[name][i])
            assert 1e-3 < rel < 0.1, (name, i, rel)
            o = np.asarray(u16[name][i]) / (0.2 * np.sqrt(max(grads[name][i].shape)))  # undo the RMS match
            s = np.linalg.svd(o, compute_uv=False)
            assert 0.6 < s.min() and s.max() < 1.2, (name, i, s.min(), s.max())
    np.testing.assert_array_equal(u16["embed"], u32["embed"])
    jaxpr = str(jax.make_jaxpr(lambda g: tx16.update(g, tx16.init(params), params)[0])(grads))
    bf16_products = re.findall(r"bf16\[[\d,]*\] = dot_general", jaxpr)
    assert len(bf16_products) == 2 * 3, bf16_products  # per Muon leaf, the iteration's 3 products


def test_agrees_with_optax_contrib_muon():
    params, infos = k2_tree()
    ours = muon_or_adamw(0.01, infos, OptimConfig(momentum=0.95, nesterov=True, rms_scale=0.2, weight_decay=0.1,
                                                  adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8))
    dims = {"experts": MuonDimensionNumbers((1,), (2,)), "layers_w": MuonDimensionNumbers((1,), (2,)),
            "embed": None, "norm": None}
    # optax's AdamW branch shares Muon's nesterov flag and one weight decay; compare the matrices only
    ref = optax.contrib.muon(0.01, beta=0.95, nesterov=True, weight_decay=0.1, muon_weight_dimension_numbers=dims,
                             consistent_rms=0.2, adam_b1=0.9, adam_b2=0.95, adam_weight_decay=0.1)
    s_ours, s_ref = ours.init(params), ref.init(params)
    p_ours = p_ref = params
    for step in range(3):
        grads, _ = k2_tree(10 + step)
        u, s_ours = ours.update(grads, s_ours, p_ours)
        v, s_ref = ref.update(grads, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u), optax.apply_updates(p_ref, v)
    for name in ("experts", "layers_w"):
        np.testing.assert_allclose(p_ours[name], p_ref[name], rtol=1e-4, atol=1e-5)


def test_every_matrix_of_the_model_is_orthogonalised_and_rms_matched_on_its_own():
    """From the model itself (tiny: MLA, a dense and a MoE layer, stacked layers, stacked experts, a shared
    expert): each Muon matrix of each layer and each expert is orthogonalised alone, its RMS matched by its
    own (fan-in, fan-out), never across the layer or expert axes. Every stacked slice's gradient gets a
    different scale (x10 per slice): a Frobenius norm or Newton-Schulz taken over the whole stack (the
    mistake peers made) would leave the small slices far from orthogonal."""
    from flax import nnx

    from k2jax.config import get_preset
    from k2jax.model.transformer import Transformer
    from k2jax.optim.muon import MUON, rule_of
    from k2jax.params import is_info, param_info

    abstract = nnx.eval_shape(lambda: Transformer(get_preset("tiny"), nnx.Rngs(0)))
    _, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    infos = param_info(abstract_params)
    shapes = nnx.to_pure_dict(abstract_params)
    keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(shapes))))

    def gradient(x, info):
        g = jax.random.normal(next(keys), x.shape)
        if info.batch_axes:  # slice i of the stacked axes scaled by 10 ** (i % 3)
            stacked = [x.shape[a] for a in info.batch_axes]
            scale = (10.0 ** (np.arange(np.prod(stacked)) % 3)).reshape(stacked)
            g = g * jnp.expand_dims(scale, [a for a in range(x.ndim) if a not in info.batch_axes])
        return g

    grads = jax.tree.map(gradient, shapes, infos, is_leaf=is_info)
    params = jax.tree.map(jnp.zeros_like, grads)
    tx = muon_or_adamw(1.0, infos, OptimConfig(weight_decay=0.0, momentum=0.0, nesterov=False, rms_scale=0.2))
    updates = tx.update(grads, tx.init(params), params)[0]
    checked = 0
    for info, g, u in zip(jax.tree.leaves(infos, is_leaf=is_info), jax.tree.leaves(grads), jax.tree.leaves(updates)):
        if rule_of(info) != MUON:
            continue
        order = info.batch_axes + info.reduction_axes + info.output_axes
        a = int(np.prod([g.shape[i] for i in info.reduction_axes]))
        b = int(np.prod([g.shape[i] for i in info.output_axes]))
        g3 = np.transpose(np.asarray(g), order).reshape(-1, a, b)  # (stacked slices, fan-in, fan-out)
        u3 = np.transpose(np.asarray(u), order).reshape(-1, a, b)
        for gi, ui in zip(g3, u3):
            expected = -np.asarray(_orthogonalise(jnp.asarray(gi))) * 0.2 * np.sqrt(max(a, b))
            np.testing.assert_allclose(ui, expected, rtol=3e-3, atol=3e-4, err_msg=str(info.axes))
            checked += 1
    assert checked >= 20  # attention projections of 2 layers, dense FFN, router-free expert stacks, shared expert
