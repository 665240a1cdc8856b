"""Property tests for backprop and the loss: is `backward` really the derivative of `total_loss`?

`fmnist.backward` is the chain rule written out by hand, so nothing but a test stands between a
typo in it and a network that trains a little worse for no visible reason. The test here is the
definition of a derivative: nudge one parameter by +h and by -h, and the loss must change by about
2h times the gradient that `backward` reported for that parameter. (The plain difference is off by
about h^2 L''' / 6, which batch norm can make large, so the numerical side is Richardson's
extrapolation (4 N(h) - N(2h)) / 3 of two such differences, in which the h^2 terms cancel.) The
networks are tiny (1-3 hidden layers of width 1-8), so every single parameter is checked, not a
sample of them.

The second half checks the softmax and cross-entropy that feed backprop: they must survive logits
that would overflow a naive `exp`, and the fused gradient `(softmax - onehot) / B` must have the
structure that shift invariance forces on it (every row sums to zero). Label smoothing (a softened
target) and test-time mirror averaging (logits that are the log of a mean of two softmaxes) are
checked against the same standards.

Hypothesis draws the networks, batches, dropout masks and logits from the named strategies below;
the number of examples comes from the profile in conftest.py (`HYPOTHESIS_PROFILE=heavy` for many).

Run: `python -m pytest test_gradients.py -q`
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fmnist as fm

# ================================================================================================
# Numerical constants, and why they have these values
# ================================================================================================

EPS64 = np.finfo(np.float64).eps   # 2.2e-16: relative rounding error of one float64 operation

# Central differences N(h) = (L(p + h) - L(p - h)) / 2h have two errors that pull h in opposite
# ways:
#   truncation  ~ h^2 / 6 * L'''             (shrinks with h: 1.7e-13 * L''' at h = 1e-6)
#   rounding    ~ eps * |L| / h              (grows as h shrinks: 2e-10 * |L| at h = 1e-6)
# h = 1e-6 makes both tiny for most networks, and rounding sets the absolute tolerance below. But
# L''' can be huge: with batch norm, a column whose variance is near BN_EPS (1e-5) made the
# error 1.1 times the tolerance at h = 1e-6 (bn_truncation_case, found by a targeted Hypothesis
# search): truncation, which grows as h^2, a hundred times larger at h = 1e-5. So the checks use
# Richardson's extrapolation (4 N(h) - N(2h)) / 3, fm.richardson_gradient, in which the h^2 terms
# cancel, leaving h^4 ones; its rounding error is at most (4 + 1/2) / 3 = 1.5 times that of N(h).
# (fmnist.gradient_check, the user's command, extrapolates the same way from h = 3e-5, with one
# fixed relative tolerance; here the tolerance follows the rounding term, so a smaller h, with
# less truncation error, can be used.)
H = 1e-6

# Measured, the finite-difference error stays below 1.3 * eps * max(1, |L|) / h on these networks;
# 64 (times Richardson's 1.5) leaves a wide margin while still catching any real mistake (a wrong
# gradient is off by about its own size, typically 1e-3 or more, against a tolerance of
# 2e-8 * max(1, |L|) without batch norm, and up to about 1e-5 with it, where the loss's rounding
# is magnified: see batch_norm_magnification).
ROUNDING_SAFETY = 64 * 1.5
FD_RTOL = 1e-6          # room for what truncation is left after extrapolation

# ReLU has a kink at 0 where it has no derivative: if a nudge carries a pre-activation Z across
# 0, the finite difference measures the average of two slopes, not the derivative. A change of up
# to 2h in one parameter (Richardson's wider step) moves any Z by at most 2h * |dZ/dparam|, measured
# below 90 for these small, bounded networks without batch norm, so keeping every (kept) hidden
# pre-activation at least 1000 h away from 0 keeps each nudge on one linear piece of every ReLU.
# Batch norm multiplies |dZ/dparam| by |g| / std, up to 316 times; there step_is_fine_enough,
# which skips a network whose loss does not behave smoothly within the step, is the real guard.
KINK_MARGIN = 1000 * H

DTYPES = ("float32", "float64")

# ================================================================================================
# Strategies: small networks, batches, dropout masks, logits
# ================================================================================================


class Case(NamedTuple):
    """One gradient-check problem: a network, a batch, and the fixed choices the loss depends on."""

    params: fm.Params
    x: np.ndarray                           # (B, n_in)
    labels: np.ndarray                      # (B,) integers in [0, n_out)
    masks: tuple[np.ndarray, ...] | None    # one (B, h) inverted-dropout mask per hidden layer
    l2: float


@st.composite
def layer_sizes(draw) -> tuple[int, ...]:
    """(n_in, h_1, ..., h_k, n_out): 1-3 hidden layers of width 1-8, 2-10 output classes.

    Widths overlap with each other and with batches of 1-6, so square shapes occur: there a
    transposed W or a sum over the wrong axis has the right shape, and only the values are wrong.
    Width 1 is allowed on purpose: there a missing axis broadcasts silently. Only comparing
    values, as the finite-difference checks do, catches either.
    """
    n_in = draw(st.integers(1, 8))
    hidden = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
    n_out = draw(st.integers(2, 10))
    return (n_in, *hidden, n_out)


@st.composite
def small_networks(draw, dtype: str = "float64", dropout: bool = True, l2: bool = True,
                   batch_norm: bool = False) -> Case:
    """A tiny MLP (He-initialised from a drawn seed), a batch of 1-6 bounded inputs and labels,
    and, if asked, dropout masks drawn once, an L2 strength in [0, 0.1] and batch norm.

    The biases are drawn rather than left at init's zeros, and kept at least 1/16 away from zero:
    a unit whose inputs are all zero (an all-zero x, which Hypothesis loves, or a layer below that
    ReLU switched off entirely) has Z = b, and b = 0 would put it exactly on ReLU's kink. Batch
    norm's scales g are drawn the same way (init's g = 1 would hide a g missing from a formula).
    """
    sizes = draw(layer_sizes())
    params = fm.init_params(sizes, seed=draw(st.integers(0, 2**32 - 1)), dtype=dtype,
                            batch_norm=batch_norm)
    arrays_ = {name: np.array(a) for name, a in params.items()}
    width = 32 if dtype == "float32" else 64
    for name, a in arrays_.items():
        if name.startswith(("b", "g")):
            magnitudes = st.floats(1 / 16, 1, width=width)      # bounds exact in float32
            arrays_[name] = draw(arrays(dtype, a.shape, elements=st.one_of(
                magnitudes, magnitudes.map(lambda m: -m))))
    params = fm.Params.from_arrays(arrays_)
    batch = draw(st.integers(1, 6))
    x = draw(arrays(dtype, (batch, sizes[0]), elements=st.floats(-3, 3, width=width)))
    labels = draw(arrays(np.intp, batch, elements=st.integers(0, sizes[-1] - 1)))
    masks = None
    if dropout:
        rate = draw(st.floats(0.05, 0.6))
        masks = fm.dropout_masks(draw(st.integers(0, 2**32 - 1)), batch, sizes[1:-1], rate, dtype)
    strength = draw(st.floats(0.0, 0.1)) if l2 else 0.0
    return Case(params, x, labels, masks, strength)


def logit_matrices(dtype: str, bound: float) -> st.SearchStrategy[np.ndarray]:
    """(B, K) logits, B in 1-6 and K in 1-10, every entry finite and within +-bound."""
    width = 32 if dtype == "float32" else 64
    shapes = st.tuples(st.integers(1, 6), st.integers(1, 10))
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
    return shapes.flatmap(lambda shape: arrays(dtype, shape, elements=elements))


@st.composite
def logits_and_labels(draw, dtype: str, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """A logit matrix and one valid label per row."""
    z = draw(logit_matrices(dtype, bound))
    labels = draw(arrays(np.intp, len(z), elements=st.integers(0, z.shape[1] - 1)))
    return z, labels


# Label smoothing strengths: 0 (no smoothing) to 0.5, far beyond the usual 0.1, so that a mistake
# in how e enters the target or the gradient is large enough to see.
smoothings = st.floats(0.0, 0.5)

# The largest logits each dtype must survive: beyond exp's overflow point (88 in float32, 709 in
# float64) by far, yet small enough that z - max(z) itself (up to 2 * bound) is still finite.
EXTREME = {"float32": 1e4, "float64": 1e300}

# ================================================================================================
# Helpers: pre-activations, finite differences, comparison
# ================================================================================================


def hidden_preactivations(params, x, masks) -> list[np.ndarray]:
    """Z_l = A_{l-1} @ W_l + b_l for each hidden layer (with batch norm, g_l (Z_l - mean) / std
    + b_l, over the batch), computed here independently of fmnist: the inputs of the ReLUs."""
    L = sum(name.startswith("W") for name in params)
    A, zs = x, []
    for l in range(1, L):
        Z = A @ params[f"W{l}"]                                          # (B, n_l)
        if f"g{l}" in params:
            Z = params[f"g{l}"] * (Z - Z.mean(0)) / np.sqrt(Z.var(0) + fm.BN_EPS)
        Z = Z + params[f"b{l}"]
        zs.append(Z)
        A = np.maximum(Z, 0) * (1.0 if masks is None else masks[l - 1])  # dropout(ReLU(Z))
    return zs


def distance_to_kink(case: Case) -> float:
    """The smallest |Z| over hidden units that dropout keeps (a dropped unit outputs 0 on both
    sides of the kink, so its slope is 0 either way and it cannot spoil a finite difference)."""
    distances = [np.inf]
    for l, Z in enumerate(hidden_preactivations(case.params, case.x, case.masks)):
        kept = np.ones(Z.shape, bool) if case.masks is None else case.masks[l] != 0
        distances.append(np.abs(Z[kept]).min(initial=np.inf))
    return float(min(distances))


def assert_gradients_match(analytic, numeric, loss_scale: float, h: float = H) -> None:
    """Compare per parameter with an absolute tolerance set by the finite difference's rounding
    (loss_scale: the size of the loss's rounding error in units of eps, |L| or more).

    A purely relative test such as |a - b| / (|a| + |b|) < 1e-5 is wrong here: many gradient
    entries are tiny (1e-6, a unit that barely matters), and for them the finite difference's
    absolute rounding error, about eps * |L| / h, is larger than 1e-5 of the entry.
    """
    atol = ROUNDING_SAFETY * EPS64 * max(1.0, abs(loss_scale)) / h
    for name in analytic:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=FD_RTOL, atol=atol,
                                   err_msg=f"d(total_loss)/d{name}: backward vs finite differences")


def batch_norm_magnification(params, cache: fm.Cache) -> float:
    """How much batch norm magnifies the rounding of Z = A W: the largest |Z| |g| / std over its
    columns (0 without batch norm). Z carries a rounding error of about eps |Z|, and the
    normalisation divides Z - mean by std; in a column that hardly varies over the batch (rows
    that are all alike, say) Z - mean is that rounding error alone, and 1 / std is as large as
    1 / sqrt(BN_EPS) = 316. The loss's own rounding, which the finite difference divides by h,
    is then about eps |Z| |g| / std rather than eps |L|. `cache`: forward's, for `params`."""
    magnification = 0.0
    for l, norm in enumerate(cache.norms, start=1):
        Z = cache.inputs[l - 1] @ params[f"W{l}"]                        # (B, n_l), before the norm
        per_column = np.abs(Z).max(axis=0) * np.abs(params[f"g{l}"]) * norm.inv_std
        magnification = max(magnification, float(per_column.max()))
    return magnification


def step_is_fine_enough(loss, params, numeric, loss_scale: float) -> bool:
    """Whether a step of H resolves the loss's curvature: the estimate at H/4 agrees with it as
    closely as the check itself demands of backward. It does not when the loss bends within H,
    as batch norm can make it: a first-layer weight near 0 (-5.4e-5, once) leaves the next
    layer's batch variance so small that its normalisation divides by a std that moves with the
    weight, and the loss bends on a scale of a few H. Such a network cannot be checked at H and
    is skipped; a test of the numerical side only, it cannot hide a wrong backward."""
    finer = fm.richardson_gradient(loss, params, H / 4)
    try:
        assert_gradients_match(numeric, finer, loss_scale, h=H / 4)
    except AssertionError:
        return False
    return True


def check_backward_against_finite_differences(case: Case, smoothing: float = 0.0) -> None:
    """The heart of this file: every entry of backward's gradient against the Richardson estimate
    (fm.richardson_gradient) of the slope of total_loss along that parameter, with the
    rounding-aware tolerance of assert_gradients_match. Two kinds of network are skipped (by
    Hypothesis's `assume`, which draws another): one with a kept pre-activation within KINK_MARGIN
    of ReLU's kink, where no finite difference measures the derivative; and, with batch norm, one
    whose loss bends within the step (step_is_fine_enough, above)."""
    assume(distance_to_kink(case) > KINK_MARGIN)

    def loss(params):
        return fm.total_loss(params, case.x, case.labels, case.l2, case.masks, smoothing)

    _, cache = fm.forward(case.params, case.x, case.masks)
    analytic = fm.backward(case.params, cache, case.labels, case.l2, smoothing)
    numeric = fm.richardson_gradient(loss, case.params, H)
    loss_scale = max(abs(loss(case.params)), batch_norm_magnification(case.params, cache))
    if cache.norms:
        assume(step_is_fine_enough(loss, case.params, numeric, loss_scale))
    assert_gradients_match(analytic, numeric, loss_scale)


def onehot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[labels]                                             # (B, K)


def smoothed_targets(labels: np.ndarray, k: int, smoothing: float) -> np.ndarray:
    """The label-smoothing target T = (1 - e) onehot + e / K, written out here in float64."""
    return (1.0 - smoothing) * onehot(labels, k) + smoothing / k         # (B, K)


# ================================================================================================
# Gradient checks: backward is the derivative of total_loss
# ================================================================================================


@given(case=small_networks(dropout=True, l2=True))
def test_backward_matches_finite_differences_with_dropout_and_l2(case):
    """Every entry of `backward` equals the slope of `total_loss` along that parameter.

    This is the training objective exactly as `train_epoch` uses it: cross-entropy plus the L2
    penalty, with dropout on. Dropout is random, but for a *fixed* mask the loss is an ordinary
    (piecewise smooth) function of the parameters, and that function is what backward
    differentiates; so the masks are drawn once and reused for every loss evaluation. In float64,
    because in float32 the rounding error of the loss (1e-7 relative) divided by h would swamp
    the comparison.
    """
    check_backward_against_finite_differences(case)


@given(case=small_networks(dropout=False, l2=False))
def test_backward_matches_finite_differences_plain(case):
    """The same check for the plain network: softmax cross-entropy through ReLUs, nothing else.

    When the combined check above fails, this one tells whether the core chain rule is wrong
    or only the dropout or L2 additions to it.
    """
    check_backward_against_finite_differences(case)


@given(case=small_networks(dropout=True, l2=True), smoothing=smoothings)
def test_backward_with_label_smoothing_matches_finite_differences(case, smoothing):
    """With label smoothing e, backward is still the derivative of the loss train_epoch minimises.

    train_epoch calls backward(..., smoothing=e), and total_loss(..., smoothing=e) is the loss that
    call claims to differentiate: cross-entropy against (1 - e) onehot + e / K, plus L2, with
    dropout. Smoothing changes only the target, so only dZ_L's formula changes; if it changed
    the wrong entries (the true class only, say, or divided e by B twice) this check sees it.
    """
    check_backward_against_finite_differences(case, smoothing)


# ================================================================================================
# Batch norm: the same check through the batch's mean and variance, and what it must keep
# ================================================================================================


def identical_rows_case(rows: int = 3, value: float = 3.0) -> Case:
    """A 1-5-3 batch-norm network on a batch whose rows are all the same: each hidden column
    is constant, so Z - mean is rounding error only and 1 / std is 1 / sqrt(BN_EPS). Hypothesis
    found it while the suite was being run over and over (to check that it catches deliberate
    mistakes): before the tolerance followed batch_norm_magnification, the default profile
    failed a correct backward here about 2 runs in 100."""
    rng = np.random.default_rng(0)
    params = {k: np.array(a) for k, a in fm.init_params((1, 5, 3), 0, "float64", True).items()}
    for k in params:
        if k.startswith(("b", "g")):
            params[k] = rng.uniform(1 / 16, 1, params[k].shape) * rng.choice([-1, 1], params[k].shape)
    return Case(fm.Params.from_arrays(params), np.full((rows, 1), value),
                rng.integers(0, 3, rows), None, 0.0)


def bn_truncation_case() -> Case:
    """A 2-3-4-3 batch-norm network (values rounded to 4 digits) found by a targeted Hypothesis
    search: a column of layer 2 varies over the batch by about sqrt(BN_EPS), so the loss bends so
    sharply along g1[0] that the plain central difference's truncation error at h = 1e-6 is
    1.1 times the tolerance (as stored here; it grows as h^2). backward is right; Richardson's
    extrapolation is what makes the check see that."""
    params = {
        "W1": [[1.024, 0.3589, -0.8636], [0.03135, 0.171, -0.08161]],
        "b1": [-0.7593, -1.0, -0.1501], "g1": [-0.3864, 0.286, -0.09228],
        "W2": [[-0.3104, 0.4821, -0.2902, 0.5198], [-0.7813, 0.009373, -0.5536, 0.2107],
               [-0.01571, -1.542, 0.09783, -1.371]],
        "b2": [0.2204, -0.1401, 0.4214, 0.1862], "g2": [-0.1501, 0.1099, -0.7596, 0.709],
        "W3": [[0.04189, 0.01661, -0.08524], [0.5999, -0.3695, 0.07449],
               [-0.1141, -0.5787, -0.2005], [-0.2071, 0.5205, -0.3591]],
        "b3": [-0.3085, -0.2939, -0.9014]}
    x = [[1.262, 1.0], [1.454, 1.578], [1.71, 0.0], [-3.0, 1.203e-12], [0.4704, -1.315],
         [-0.4489, 1.292]]
    kept = ([[1, 0, 1], [0, 0, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]],
            [[1, 1, 0, 1], [0, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    masks = tuple(np.array(k, np.float64) / (1 - 0.353) for k in kept)       # dropout 0.353
    return Case(fm.Params.from_arrays({k: np.array(v) for k, v in params.items()}), np.array(x),
                np.array([2, 0, 2, 0, 0, 0]), masks, 0.02169)


@given(case=small_networks(dropout=True, l2=True, batch_norm=True))
@example(case=identical_rows_case())
@example(case=bn_truncation_case())
def test_backward_with_batch_norm_matches_finite_differences(case):
    """With batch norm, backward is still the derivative of the loss, through the batch's mean
    and variance: every row's pre-activation enters them, so nudging one weight moves every
    row's normalised value, and backward must account for all of it (batch_norm_backward's two
    shared correction terms). A backward that treated mean and std as constants would be off
    by about the gradient's own size. Batches of one row are included: then every Z_hat is 0
    and the layer's weights get exactly zero gradient, which the finite difference agrees with.
    So are batches of identical rows, where the loss's rounding is magnified (see
    batch_norm_magnification) and the tolerance with it.
    """
    check_backward_against_finite_differences(case)


def test_a_network_whose_loss_bends_within_the_step_is_told_apart_and_backward_is_right_on_it():
    """A network Hypothesis once found: batch norm twice, W1 = -5.4e-5. At H the finite
    difference is off by 2.8e-6 relative, and the check above failed a correct backward;
    step_is_fine_enough now tells it apart, and at H/10 (where the estimate has converged)
    backward agrees with it for every parameter, W1's gradient to 1e-8."""
    k = 1 / 0.75
    params = fm.Params.from_arrays({name: np.array(v, np.float64) for name, v in {
        "W1": [[-5.433619379159885e-05]], "b1": [1.0], "g1": [1.0],
        "W2": [[1.2831518345020396, -1.9126940917842206, 2.1828066796820034, -0.3290024046909682]],
        "b2": [1.0] * 4, "g2": [1.0] * 4,
        "W3": [[-0.2311666569863426, 0.2797888417611796, 0.1589008018675175, -0.3444344374654087,
                0.22114381133800973, -0.44480311339562373],
               [0.42017129467276904, 0.01905521949715018, 0.03321362409712533,
                -0.20917337864290217, 0.32462564142928674, -0.18169810405751904],
               [-0.5940641128171723, -0.8163147164981699, 1.0461273385976815,
                -0.18748242510753046, -0.0283214066613344, -0.17316615360226034],
               [0.0025689786676149694, -0.6203414292085124, -0.32216839391596497,
                0.24290073041176602, -0.598867823773093, 0.5064744287426922]],
        "b3": [1.0] * 6}.items()})
    x, labels = np.array([[-1.0], [0.0], [0.0], [0.0]]), np.zeros(4, np.intp)
    masks = (np.full((4, 1), k), np.array([[k, 0, 0, 0], [0, k, k, k], [k, k, k, k], [k, k, k, k]]))

    def loss(p):
        return fm.total_loss(p, x, labels, 0.0, masks)

    _, cache = fm.forward(params, x, masks)
    analytic = fm.backward(params, cache, labels)
    numeric = fm.richardson_gradient(loss, params, H)
    scale = max(abs(loss(params)), batch_norm_magnification(params, cache))
    with pytest.raises(AssertionError):
        assert_gradients_match(analytic, numeric, scale)
    assert not step_is_fine_enough(loss, params, numeric, scale)
    converged = fm.richardson_gradient(loss, params, H / 10)
    assert_gradients_match(analytic, converged, scale, h=H / 10)
    np.testing.assert_allclose(analytic["W1"], converged["W1"], rtol=1e-8)


@given(case=small_networks(dropout=True, l2=False, batch_norm=True), data=st.data())
def test_batch_norm_backward_removes_what_normalisation_cannot_change(case, data):
    """dZ from batch_norm_backward sums to zero down each column, and its dot product with Z_hat
    is g dg BN_EPS / std^3 (about 0 once the variance is well above BN_EPS).

    Adding a constant to a column of Z leaves the normalised output unchanged, so the loss cannot
    change in that direction and its gradient has no component along it. Scaling a column about
    its mean would leave it unchanged too but for BN_EPS, which makes the scale matter a little:
    Z_hat . dZ = g dg BN_EPS / std^3 exactly, ~0 once var >> BN_EPS. Checked on the first hidden
    layer of a network, with a random upstream gradient. The tolerance is relative, plus a floor
    of 1e-300 for upstream gradients so small (Hypothesis has drawn 1e-313) that they are
    subnormal, where rounding is absolute. These are facts of structure: a dZ missing g or 1/B
    would keep them, and the finite-difference test above is what catches a wrong scale.
    """
    _, cache = fm.forward(case.params, case.x, case.masks)
    norm, g = cache.norms[0], case.params["g1"]
    dOut = data.draw(arrays(np.float64, norm.normalised.shape, elements=st.floats(-1, 1)))
    dZ, dg, db = fm.batch_norm_backward(dOut, norm, g)
    scale = (np.abs(dOut).sum(axis=0) + np.abs(dg)) * np.abs(g) * norm.inv_std
    tolerance = 1e-12 * scale + 1e-300
    assert (np.abs(dZ.sum(axis=0)) <= tolerance).all()
    left_by_eps = g * dg * fm.BN_EPS * norm.inv_std ** 3
    assert (np.abs((dZ * norm.normalised).sum(axis=0) - left_by_eps) <= tolerance).all()
    np.testing.assert_allclose(db, dOut.sum(axis=0), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(dg, (dOut * norm.normalised).sum(axis=0), rtol=1e-12, atol=1e-12)


@given(case=small_networks(dropout=False, l2=False, batch_norm=True))
def test_batch_norm_output_has_mean_b_and_standard_deviation_g_over_the_batch(case):
    """Each unit leaves batch norm with mean b and standard deviation |g| over the batch (a bit
    less: sqrt(sigma^2 / (sigma^2 + BN_EPS)) of it), whatever the weights below: the point of it.
    Z is rebuilt from the cache, so the test first checks that it is what forward fed the ReLU."""
    _, cache = fm.forward(case.params, case.x)
    for l, norm in enumerate(cache.norms, start=1):
        Z = norm.normalised * case.params[f"g{l}"] + case.params[f"b{l}"]   # the ReLU's input
        np.testing.assert_array_equal(cache.gates[l - 1], Z > 0)
        np.testing.assert_array_equal(cache.inputs[l], np.maximum(Z, 0))   # no dropout here
        np.testing.assert_allclose(Z.mean(axis=0), case.params[f"b{l}"], rtol=0, atol=1e-12)
        var = (cache.inputs[l - 1] @ case.params[f"W{l}"]).var(axis=0)
        expected = np.abs(case.params[f"g{l}"]) * np.sqrt(var / (var + fm.BN_EPS))
        np.testing.assert_allclose(Z.std(axis=0), expected, rtol=1e-9, atol=1e-12)


@given(offset=st.floats(100, 1e4), seed=st.integers(0, 2**32 - 1))
def test_batch_norm_in_float32_centres_before_it_squares(offset, seed):
    """In float32, a column whose values share a large offset (1000 + noise of spread 1, say)
    still comes out with mean 0 and spread 1: the variance is the mean of (Z - mean)^2. The
    textbook shortcut E[Z^2] - E[Z]^2 subtracts two numbers near 1e6 that agree in all but
    their last digits, and float32 keeps only 7 of them."""
    Z = (offset + np.random.default_rng(seed).normal(size=(64, 8))).astype(np.float32)
    out, norm = fm.batch_norm_forward(Z, np.ones(8, np.float32), np.zeros(8, np.float32))
    centred = Z.astype(np.float64) - Z.astype(np.float64).mean(axis=0)
    expected = np.sqrt(centred.var(axis=0) / (centred.var(axis=0) + fm.BN_EPS))
    np.testing.assert_allclose(out.astype(np.float64).std(axis=0), expected, rtol=1e-3)
    mean_rounding = 8 * offset * np.finfo(np.float32).eps           # of float32's mean of Z
    np.testing.assert_allclose(out.astype(np.float64).mean(axis=0), 0.0, atol=mean_rounding)


# ================================================================================================
# The gradcheck command: a learner's own check must pass this module's backward
# ================================================================================================


@settings(max_examples=max(3, settings().max_examples // 5))   # seconds each: 784 inputs make
                                                                # up to ~3,000 parameters, 4 losses each
@given(hidden=st.lists(st.integers(1, 4), min_size=1, max_size=3), batch=st.integers(2, 5),
       seed=st.integers(0, 2**32 - 1), batch_norm=st.booleans())
@example(hidden=[3, 3, 3], batch=3, seed=9, batch_norm=True)    # plain differences fail it
def test_the_gradcheck_command_passes_the_modules_own_backward(hidden, batch, seed, batch_norm):
    """`fmnist gradcheck` must say PASS for this module's backward on the small networks it
    builds (here 1-3 hidden layers of width 1-4, batches of 2-5, with and without batch norm, the
    command's default dropout and L2): a learner who sees FAIL will look for a bug that is not
    there. Its fixed relative tolerance is not the rounding-aware one above, so it is checked on
    its own."""
    case = fm.gradcheck_case(tuple(hidden), batch, seed, batch_norm=batch_norm)
    assert max(error for _, error in fm.gradient_check(case).values()) < fm.GRADCHECK_TOL


# ================================================================================================
# Gradients' form, the L2 term, and ReLU at its kink
# ================================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_gradients_have_the_keys_shapes_and_dtype_of_params(dtype, data):
    """backward returns one gradient per parameter, named and shaped like it, in the same dtype.

    The optimizer pairs each parameter with the gradient of the same name and subtracts them
    elementwise, so a missing key or a wrongly shaped matrix would break every step, and a float64
    gradient for float32 parameters would silently turn them into float64. (This backward
    allocates its gradients from the parameters' own shapes, so names and shapes hold by
    construction; the test pins the contract for any rewrite. The dtype and finiteness checks are
    the ones that can fail today.)
    """
    case = data.draw(small_networks(dtype=dtype, batch_norm=data.draw(st.booleans())))
    _, cache = fm.forward(case.params, case.x, case.masks)
    grads = fm.backward(case.params, cache, case.labels, case.l2)
    assert list(grads) == list(case.params)
    for name, p in case.params.items():
        assert grads[name].shape == p.shape, name
        assert grads[name].dtype == p.dtype, name
        assert np.isfinite(grads[name]).all(), name


def test_l2_penalty_is_half_lambda_times_the_squared_weights_by_hand():
    """(lambda / 2) * sum of squared weights, biases excluded: 0.1 / 2 * (1 + 4 + 9 + 16 + 4) = 1.7.
    Its gradient lambda W is checked against finite differences of the whole loss above."""
    params = {"W1": np.array([[1.0, 2.0], [3.0, 4.0]]), "b1": np.array([5.0, 6.0]),
              "W2": np.array([[-2.0], [0.0]]), "b2": np.array([7.0])}
    assert fm.l2_penalty(params, 0.1) == pytest.approx(1.7, rel=1e-15)
    assert fm.l2_penalty(params, 0.0) == 0.0


@given(case=small_networks(dropout=True, l2=True))
def test_l2_adds_exactly_lambda_w_to_weight_gradients_only(case):
    """d/dW ((lambda / 2) ||W||^2) = lambda W, and the penalty does not depend on the data.

    So switching L2 on must add lambda W to each weight gradient and change nothing else: the
    biases are not penalised, and the data term is unaffected. Up to two roundings (the addition
    in backward, the subtraction here), (g + c) - g == c within 2 eps (|g| + |c|).
    """
    _, cache = fm.forward(case.params, case.x, case.masks)
    with_l2 = fm.backward(case.params, cache, case.labels, case.l2)
    without = fm.backward(case.params, cache, case.labels, 0.0)
    for name, p in case.params.items():
        if name.startswith("b"):
            np.testing.assert_array_equal(with_l2[name], without[name], err_msg=name)
        else:
            penalty = case.l2 * p
            tolerance = 2 * EPS64 * (np.abs(without[name]) + np.abs(penalty))
            assert (np.abs((with_l2[name] - without[name]) - penalty) <= tolerance).all(), name


def test_relu_passes_no_gradient_at_exactly_zero():
    """ReLU has no derivative at 0; backward takes 0 there (the gate is 1[Z > 0]), as PyTorch
    does. The finite-difference checks keep every Z away from 0, so they cannot see this case,
    which happens in practice (zero biases, init's, and an all-zero input give Z = 0 exactly).
    Here the bias is set to -x W1, so that Z1 = x W1 + b1 is exactly 0 for a nonzero input: a
    gate of 1[Z >= 0] would pass gradient to units that are off, and W1's gradient x^T dZ1 would
    not be 0."""
    params = {k: np.array(a) for k, a in fm.init_params((3, 4, 2), seed=0, dtype="float64").items()}
    x, labels = np.array([[1.0, -2.0, 0.5]] * 2), np.array([0, 0])
    params["b1"] = -(x @ params["W1"])[0]                        # the product forward computes
    _, cache = fm.forward(params, x)
    assert not cache.gates[0].any()                                     # Z1 = 0: every gate shut
    grads = fm.backward(params, cache, labels)
    assert not grads["b1"].any() and not grads["W1"].any()
    assert grads["b2"].any()                                            # the output layer learns


# ================================================================================================
# Softmax and log-softmax: stable for any finite logits
# ================================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_softmax_is_invariant_to_adding_a_constant_to_each_row(dtype, data):
    """softmax(z + c) = softmax(z), since exp(z_i + c) / sum_j exp(z_j + c) cancels exp(c).

    This is what makes the stable implementation legal: subtracting the row maximum is a shift,
    so it changes nothing mathematically while keeping every exp() argument <= 0. Shifts up to
    1e3 overflow a naive exp (exp(89) is inf in float32, exp(710) in float64); here they must not.

    Rounding: forming z + c perturbs each exponent by about eps * (|z| + |c|), which moves each
    probability (all in [0, 1]) by at most about twice that, so an absolute tolerance scaled by
    the magnitudes involved is the honest one.
    """
    z = data.draw(logit_matrices(dtype, 50.0), label="z")
    c = data.draw(arrays(dtype, (len(z), 1), elements=st.floats(
        -1e3, 1e3, width=32 if dtype == "float32" else 64)), label="c")
    shifted = z + c
    eps = np.finfo(dtype).eps
    tolerance = 8 * eps * (1 + np.abs(z).max() + np.abs(shifted).max())
    np.testing.assert_allclose(fm.softmax(shifted), fm.softmax(z), rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_softmax_of_extreme_logits_is_a_probability_distribution(dtype, data):
    """Each row of softmax is a distribution: entries finite, in [0, 1], summing to one.

    With logits up to 1e4 (float32) or 1e300 (float64), exp(z) alone would be inf and inf / inf
    NaN. After subtracting the row max, the largest term is exp(0) = 1 and the rest are in
    [0, 1], so the sum is in [1, K]: nothing can overflow and nothing is divided by zero.
    """
    z = data.draw(logit_matrices(dtype, EXTREME[dtype]), label="z")
    p = fm.softmax(z)
    assert p.shape == z.shape and p.dtype == z.dtype
    assert np.isfinite(p).all()
    assert ((0 <= p) & (p <= 1)).all()
    K = z.shape[1]
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=2 * K * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_log_softmax_is_the_log_of_softmax_but_never_minus_infinity(dtype, data):
    """log_softmax(z) = log(softmax(z)), computed as (z - max) - log(sum exp(z - max)).

    Where softmax underflows to 0 (a logit far below the row max), log(softmax) is -inf, yet the
    true value, z_i - max - log(sum), is a perfectly ordinary number; log_softmax returns it, and
    that is why cross-entropy is computed from log_softmax rather than from log(softmax). So:
    log_softmax is finite and <= 0 everywhere, and agrees with log(softmax) wherever softmax is a
    normal (not underflowed or subnormal) float, within a few rounding errors of the value.
    """
    z = data.draw(logit_matrices(dtype, EXTREME[dtype]), label="z")
    log_p = fm.log_softmax(z)
    assert np.isfinite(log_p).all()
    assert (log_p <= 0).all()
    p = fm.softmax(z)
    normal = p >= np.finfo(dtype).tiny
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(log_p[normal], np.log(p[normal]), rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cross_entropy_of_extreme_logits_is_finite_and_non_negative(dtype, data):
    """Cross-entropy is -mean(log p(true class)): >= 0 because probabilities are <= 1, and finite.

    Finite, with bounds: -log p_y = log(sum_j exp(z_j - max)) + (max - z_y), and the sum holds
    exp(0) = 1 and at most K terms, so max - z_y <= -log p_y <= log K + (max - z_y). A clipped
    implementation (log(max(p, 1e-12))) would instead cap the loss at 27.6, below the lower
    bound, and lose the gradient signal for confidently wrong predictions.
    """
    z, labels = data.draw(logits_and_labels(dtype, EXTREME[dtype]))
    loss = fm.cross_entropy(z, labels)
    assert np.isfinite(loss)
    assert loss >= 0
    (B, K), rows = z.shape, np.arange(len(z))
    gap = (z.max(axis=1).astype(np.float64) - z[rows, labels].astype(np.float64)).mean()
    bound = gap + np.log(K)
    tolerance = 4 * (B + K) * np.finfo(dtype).eps * (1 + bound)
    assert gap - tolerance <= loss <= bound + tolerance


@pytest.mark.parametrize("dtype, z, labels, expected_log_p", [
    # exp(1000) is inf: the naive formula gives inf / inf = NaN in the first column.
    ("float64", [[1000.0, 0.0]], [1], [[0.0, -1000.0]]),
    # exp(-1000) is 0: the naive formula gives 0 / 0 = NaN everywhere.
    ("float64", [[-1000.0, -1000.0]], [0], [[-np.log(2), -np.log(2)]]),
    ("float64", [[1e300, -1e300]], [1], [[0.0, -2e300]]),
    ("float32", [[1e4, -1e4, 0.0]], [2], [[0.0, -2e4, -1e4]]),
])
def test_softmax_survives_the_logits_that_break_the_naive_formula(dtype, z, labels, expected_log_p):
    """Hand-picked rows where exp(z) / sum(exp(z)) over- or underflows, with their exact answers.

    Each answer is exact up to rounding: the terms dropped (such as e^-1000 next to 1) are far
    below one unit in the last place.
    """
    z, labels, expected_log_p = np.array(z, dtype), np.array(labels), np.array(expected_log_p)
    np.testing.assert_allclose(fm.log_softmax(z), expected_log_p, rtol=1e-6)
    np.testing.assert_allclose(fm.softmax(z), np.exp(expected_log_p), rtol=1e-6)
    expected_loss = -expected_log_p[np.arange(len(labels)), labels].mean()
    np.testing.assert_allclose(fm.cross_entropy(z, labels), expected_loss, rtol=1e-6)


# ================================================================================================
# Label smoothing: cross-entropy against the target (1 - e) onehot + e / K
# ================================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cross_entropy_with_smoothing_is_the_cross_entropy_of_the_smoothed_target(dtype, data):
    """cross_entropy(z, y, e) = -mean_b sum_k T_bk log softmax(z)_bk with T the smoothed target,
    and smoothing 0 is the plain cross-entropy exactly (the report's recipe must not move).

    fmnist computes it as (1 - e)(-log p_y) + e mean_k(-log p_k), which is the same sum regrouped;
    here T is written out as a matrix. Rounding: a few eps of the largest |log p| per term.
    """
    z, labels = data.draw(logits_and_labels(dtype, 50.0))
    smoothing = data.draw(st.floats(0.0, 1.0, exclude_max=True), label="smoothing")
    B, K = z.shape
    log_p = fm.log_softmax(z).astype(np.float64)
    expected = -(smoothed_targets(labels, K, smoothing) * log_p).sum(axis=1).mean()
    tolerance = 4 * (B + K) * np.finfo(dtype).eps * (1 + np.abs(log_p).max())
    assert abs(fm.cross_entropy(z, labels, smoothing) - expected) <= tolerance
    plain = -fm.log_softmax(z)[np.arange(B), labels].mean()                   # -mean log p_y
    assert fm.cross_entropy(z, labels, 0.0) == plain


@given(z_and_labels=logits_and_labels("float64", 50.0), smoothing=st.floats(1e-3, 0.99))
def test_smoothed_cross_entropy_is_smallest_at_finite_logits_where_softmax_is_the_target(
        z_and_labels, smoothing):
    """Why smoothing curbs overconfidence: the loss is at least the entropy H(T) of the target
    (Gibbs' inequality, -sum T log p >= -sum T log T), with equality at p = T, that is at the
    finite logits z = log T. Plain cross-entropy only approaches its infimum 0 as the true logit
    runs off to infinity, and so keeps rewarding ever larger logits; the smoothed loss does not.
    """
    z, labels = z_and_labels
    B, K = z.shape
    T = smoothed_targets(labels, K, smoothing)
    entropy = -(T * np.log(T)).sum(axis=1).mean()
    tolerance = 8 * (B + K) * EPS64 * (1 + np.abs(fm.log_softmax(z)).max() + np.abs(np.log(T)).max())
    assert fm.cross_entropy(z, labels, smoothing) >= entropy - tolerance
    assert abs(fm.cross_entropy(np.log(T), labels, smoothing) - entropy) <= tolerance


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cross_entropy_with_smoothing_of_extreme_logits_is_finite_and_bounded(dtype, data):
    """Smoothing adds e mean_k(-log p_k), which involves the *least* likely classes too, whose
    -log p (up to 2e300 in float64) a log(softmax) implementation would turn into inf (and a
    clipped one cap at 27.6). Each -log p_k is in [max - z_k, log K + (max - z_k)] (see
    test_cross_entropy_of_extreme_logits_is_finite_and_non_negative), so the loss, the
    mean of sum_k T_k (-log p_k), stays within log K above mean sum_k T_k (max - z_k), and not below.
    """
    z, labels = data.draw(logits_and_labels(dtype, EXTREME[dtype]))
    smoothing = data.draw(st.floats(0.0, 1.0, exclude_max=True), label="smoothing")
    loss = fm.cross_entropy(z, labels, smoothing)
    assert np.isfinite(loss) and loss >= 0
    B, K = z.shape
    z64 = z.astype(np.float64)
    gaps = z64.max(axis=1, keepdims=True) - z64                          # (B, K), >= 0
    floor = (smoothed_targets(labels, K, smoothing) * gaps).sum(axis=1).mean()
    bound = np.log(K) + floor
    tolerance = 4 * (B + K) * np.finfo(dtype).eps * (1 + bound)
    assert floor - tolerance <= loss <= bound + tolerance


# ================================================================================================
# The cross-entropy gradient (softmax - onehot) / B, and what shift invariance forces on it
# ================================================================================================


def logit_gradient(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """backward's dL/dZ_L for logits z (B, K), read from backward itself: a one-layer network
    with W = z, b = 0 and the identity matrix as its batch has logits z, and its weight gradient
    I^T dZ_L is dZ_L."""
    params = fm.Params.from_arrays({"W1": z, "b1": np.zeros(z.shape[1], z.dtype)})
    logits, cache = fm.forward(params, np.eye(len(z), dtype=z.dtype))
    assert np.array_equal(logits, z)
    return fm.backward(params, cache, labels)["W1"]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_backward_logit_gradient_rows_sum_to_zero_even_at_extreme_logits(dtype, data):
    """Each row of backward's dL/dZ_L = (softmax(z) - onehot(y)) / B sums to (1 - 1) / B = 0.

    Seen from calculus: the loss does not change when a constant is added to a row of logits
    (shift invariance), so its gradient with respect to that row has no component along
    (1, ..., 1); that is, the row of dL/dZ sums to zero. Read straight from `backward`
    (logit_gradient), at logits far beyond what exp can take. This is structure only (a -1 in the
    wrong class would keep it); the next tests check the values.
    """
    z, labels = data.draw(logits_and_labels(dtype, EXTREME[dtype]))
    B, K = z.shape
    dz = logit_gradient(z, labels)                                             # (B, K)
    assert np.isfinite(dz).all()
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, rtol=0, atol=4 * K * np.finfo(dtype).eps / B)


def flush_example() -> tuple[np.ndarray, np.ndarray]:
    """Four rows whose second class has probability e^-42.65 = 3e-19: above sqrt(tiny) = 1.1e-19,
    but divided by B = 4 below it, so the flush must come after the division by B."""
    z = np.tile(np.array([21.3, -21.35, 0.0], np.float32), (4, 1))
    return z, np.zeros(4, np.intp)


@given(z_and_labels=logits_and_labels("float32", 30.0))
@example(z_and_labels=flush_example())
def test_float32_logit_gradient_is_the_float64_one_but_for_the_flushed_tiny_numbers(z_and_labels):
    """backward flushes entries of dL/dZ_L below about 1e-19 to zero (flush_to_zero, to keep
    subnormal numbers out of the matrix products) and changes nothing else by more than that
    flush's own rounding (up to 2 sqrt(tiny)) allows: in float32, with
    logits within +-30 (probabilities down to e^-60 = 9e-27, so some entries are flushed), no
    nonzero entry is below sqrt(tiny) = 1.1e-19, and every entry equals the float64
    (softmax(z) - onehot(y)) / B of the same logits to 1e-4 relative, or to 2 sqrt(tiny) = 2.2e-19
    absolute, plus float32's rounding of p - 1 in the true class. A flush at a higher threshold
    would zero probabilities that still count; a lower one, or none, would leave tiny numbers."""
    z, labels = z_and_labels
    B, K = z.shape
    dz = logit_gradient(z, labels).astype(np.float64)                          # (B, K)
    assert (np.abs(dz[dz != 0]) >= np.sqrt(np.finfo(np.float32).tiny)).all()
    expected = (fm.softmax(z.astype(np.float64)) - onehot(labels, K)) / B
    flushed = 2 * np.sqrt(np.finfo(np.float32).tiny)
    rounding_of_p_minus_1 = onehot(labels, K) * 4 * np.finfo(np.float32).eps / B
    assert (np.abs(dz - expected) <= 1e-4 * np.abs(expected) + flushed + rounding_of_p_minus_1).all()


@given(z_and_labels=logits_and_labels("float64", 20.0))
def test_cross_entropy_gradient_is_softmax_minus_onehot_over_batch(z_and_labels):
    """d cross_entropy / d logits = (softmax(z) - onehot(y)) / B, checked by finite differences;
    and backward's dL/dZ_L (logit_gradient) is that formula.

    This is the starting point of backward, derived once on paper:
        L = -(1/B) sum_b (z_{b,y_b} - log sum_j exp z_{b,j}),
    so  dL/dz_{b,k} = (p_{b,k} - [k = y_b]) / B,  with p = softmax(z).
    Cross-entropy is smooth in the logits (no kinks), so no example needs to be rejected.
    """
    z, labels = z_and_labels
    B, K = z.shape
    expected = (fm.softmax(z) - onehot(labels, K)) / B
    numeric = np.empty_like(z)
    for b, k in np.ndindex(z.shape):
        plus, minus = z.copy(), z.copy()
        plus[b, k] += H
        minus[b, k] -= H
        rise = fm.cross_entropy(plus, labels) - fm.cross_entropy(minus, labels)
        numeric[b, k] = rise / (plus[b, k] - minus[b, k])
    atol = ROUNDING_SAFETY * EPS64 * max(1.0, fm.cross_entropy(z, labels)) / H
    np.testing.assert_allclose(numeric, expected, rtol=FD_RTOL, atol=atol)
    np.testing.assert_allclose(logit_gradient(z, labels), expected, rtol=1e-12, atol=4 * EPS64 / B)


def check_output_layer_row_sums(case: Case, smoothing: float) -> None:
    """db_L and dW_L - lambda W_L from backward against dZ_L = (softmax - T) / B and A^T dZ_L,
    recomputed in float64 from the logits and the layer's input, and their sums over the classes
    against zero."""
    params, B = case.params, len(case.labels)
    dtype = params.flat.dtype
    L = fm.num_layers(params)
    logits, cache = fm.forward(params, case.x, case.masks)
    grads = fm.backward(params, cache, case.labels, case.l2, smoothing)
    K = logits.shape[1]
    target = smoothed_targets(case.labels, K, smoothing)                         # onehot at e = 0
    dz = (fm.softmax(logits.astype(np.float64)) - target) / B                    # (B, K)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(grads[f"b{L}"], dz.sum(axis=0), rtol=0, atol=4 * K * eps)
    assert abs(grads[f"b{L}"].astype(np.float64).sum()) <= 4 * K * eps
    data_part = grads[f"W{L}"].astype(np.float64) - case.l2 * params[f"W{L}"].astype(np.float64)
    Z = hidden_preactivations(params, case.x, case.masks)[-1]                    # (B, n_{L-1})
    A = np.maximum(Z, 0) * (1.0 if case.masks is None else case.masks[-1])      # input of layer L
    scale = np.abs(A).max() + np.abs(params[f"W{L}"]).max()
    np.testing.assert_allclose(data_part, A.T @ dz, rtol=0, atol=8 * (B + K) * eps * (1 + scale))
    np.testing.assert_allclose(data_part.sum(axis=1), 0.0, rtol=0, atol=8 * K * eps * (1 + scale))


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_output_layer_gradients_inherit_the_zero_row_sums(dtype, data):
    """backward's output-layer gradients are built from dZ_L = (softmax - onehot) / B:

    * db_L = sum over the batch of dZ_L, which we recompute here from the logits;
    * since every row of dZ_L sums to zero, so does db_L over the classes;
    * dW_L - lambda W_L = A^T dZ_L, with A the layer's input (after ReLU and dropout), and it
      inherits the zero sums: each of its rows sums to zero, i.e. adding the same amount to all
      of a unit's outgoing weights changes no loss.
    Dropout and L2 are on: neither touches dZ_L, so neither may change these facts.
    """
    check_output_layer_row_sums(data.draw(small_networks(dtype=dtype)), smoothing=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_output_layer_gradients_with_label_smoothing_keep_the_zero_row_sums(dtype, data):
    """With label smoothing dZ_L = (softmax - T) / B, T = (1 - e) onehot + e / K; a row of T sums
    to (1 - e) + K e / K = 1, just as a one-hot row does, so every fact above still holds: the
    loss is still shift invariant. (Subtracting e / K from the true class only, or forgetting the
    (1 - e), would leave rows summing to e - e / K or to e, and show up here at once.)
    """
    case = data.draw(small_networks(dtype=dtype))
    check_output_layer_row_sums(case, smoothing=data.draw(smoothings, label="smoothing"))


# ================================================================================================
# Test-time mirror averaging: "logits" that are the log of the mean of two softmaxes
# ================================================================================================

# How far the output weights are scaled up (by 10^k, k drawn up to this) to push the logits past
# anything exp can take, while z - max(z) stays finite: logits near 1e31 in float32, 1e300 in float64.
MAX_SCALE_EXPONENT = {"float32": 30, "float64": 300}


@st.composite
def image_networks(draw, dtype: str) -> tuple[fm.Params, np.ndarray, np.ndarray]:
    """A (784, h, K) network, h in 1-4 and K in 2-10, whose output weights are multiplied by
    10^k (from ordinary logits at k = 0 to extreme ones), and 1-5 random images with labels.

    784 inputs, because mirroring needs whole 28 x 28 images; the images come from a drawn seed
    rather than element by element, which would be slow for 784 numbers and add nothing here.
    """
    hidden, classes = draw(st.integers(1, 4)), draw(st.integers(2, 10))
    seed = draw(st.integers(0, 2**32 - 1))
    arrays_ = {k: np.array(v) for k, v in fm.init_params((784, hidden, classes), seed, dtype).items()}
    arrays_["W2"] *= np.dtype(dtype).type(10.0 ** draw(st.integers(0, MAX_SCALE_EXPONENT[dtype])))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(draw(st.integers(1, 5)), 784)).astype(dtype)
    return fm.Params.from_arrays(arrays_), x, rng.integers(0, classes, len(x))


def mean_of_the_two_softmaxes(params, x) -> np.ndarray:
    """(softmax(f(x)) + softmax(f(mirror(x)))) / 2 in float64: what flip averaging must predict."""
    plain = fm.predict_logits(params, x).astype(np.float64)
    mirrored = fm.predict_logits(params, fm.mirror(x)).astype(np.float64)
    return (fm.softmax(plain) + fm.softmax(mirrored)) / 2                  # (B, K)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_flip_averaged_logits_are_log_probabilities_whose_softmax_is_the_mean(dtype, data):
    """predict_logits(flip_average=True) returns log(mean of the two distributions), so that
    softmax (and argmax, and cross_entropy) work on it unchanged: softmax(log q) = q whenever q
    sums to one. Computed as logaddexp of two log_softmaxes, it stays finite where the naive
    log((softmax(a) + softmax(b)) / 2) gives log(0) = -inf: at logits near 1e300 every class
    but the winner has probability 0 in floating point.
    """
    params, x, _ = data.draw(image_networks(dtype))
    flip = fm.predict_logits(params, x, flip_average=True)
    assert flip.shape == (len(x), params["b2"].shape[0]) and flip.dtype == np.dtype(dtype)
    eps = np.finfo(dtype).eps
    assert np.isfinite(flip).all()
    assert (flip <= 4 * eps).all()                                    # log-probabilities: <= 0
    K = flip.shape[1]
    np.testing.assert_allclose(fm.softmax(flip.astype(np.float64)),
                               mean_of_the_two_softmaxes(params, x), rtol=0, atol=8 * K * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_evaluate_with_flip_averaging_scores_the_mean_prediction(dtype, data):
    """evaluate(flip_average=True) predicts a class that the mean distribution q ranks first (up
    to rounding, for near-ties) and its loss is -mean log q_y: finite even for extreme logits,
    and equal to -log q_y wherever q_y is a normal float64 (elsewhere log q_y is -inf).
    """
    params, x, labels = data.draw(image_networks(dtype))
    ev = fm.evaluate(params, x, labels, flip_average=True)
    flip = fm.predict_logits(params, x, flip_average=True)
    q = mean_of_the_two_softmaxes(params, x)                          # (B, K)
    eps, rows = np.finfo(dtype).eps, np.arange(len(x))
    assert np.array_equal(ev.predictions, flip.argmax(axis=1))
    assert (q[rows, ev.predictions] >= q.max(axis=1) - 8 * q.shape[1] * eps).all()
    assert ev.loss == fm.cross_entropy(flip, labels)
    assert np.isfinite(ev.loss) and ev.loss >= 0
    per_example = np.array([fm.cross_entropy(flip[i:i + 1], labels[i:i + 1]) for i in rows])
    normal = q[rows, labels] >= np.finfo(np.float64).tiny
    np.testing.assert_allclose(per_example[normal], -np.log(q[rows, labels][normal]),
                               rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_flip_averaging_cannot_tell_an_image_from_its_mirror_image(dtype, data):
    """The flip-averaged prediction for an image and for its mirror image are one and the same
    average (of the same two distributions, in the other order): a mirrored shirt gets exactly
    the prediction of the shirt. Rounding aside, that is; the tolerance allows a few eps.
    """
    params, x, _ = data.draw(image_networks(dtype))
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(fm.predict_logits(params, fm.mirror(x), flip_average=True),
                               fm.predict_logits(params, x, flip_average=True),
                               rtol=8 * eps, atol=8 * eps)
