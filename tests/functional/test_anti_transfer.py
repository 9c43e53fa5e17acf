"""`anti_transfer` against the float64 oracle of METHODS.md §1, and on hostile input."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, assert_matches_oracle, value_and_grads

import negtransfer_losses.functional as ntf
from negtransfer_losses.functional.anti_transfer import AntiTransferOptions, compute_anti_transfer_terms

CHANNEL_AGGREGATIONS = ["none", "mean", "sum", "max", "mul"]
DISTANCES = ["cos_squared", "cos", "mse_sigmoid", "cka"]
CASES = [(a, d, None) for a in CHANNEL_AGGREGATIONS for d in DISTANCES] + [
    ("gram", d, scope) for d in DISTANCES for scope in ("batch", "sample") if (d, scope) != ("cka", "batch")
]


def maps(*shape: int, seed: int = 0, positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, r = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    r = r + 0.5 * s  # correlated, so similarities are far from 0
    return (s.abs() + 0.05, r.abs() + 0.05) if positive else (s, r)


@pytest.mark.parametrize(("aggregation", "distance", "scope"), CASES)
def test_every_pair_matches_oracle_values_and_gradients(aggregation: str, distance: str, scope: str | None) -> None:
    s, r = maps(3, 4, 5, 2, positive=aggregation == "mul")
    kwargs = dict(aggregation=aggregation, distance=distance, gram_scope=scope)
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, **kwargs),  # type: ignore[arg-type]
        lambda a, b: oracles.anti_transfer(a, b, aggregation, distance, scope or "batch"),
        s,
        r,
        rtol=1e-9,
        atol=1e-10,
    )


def spread_maps(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of magnitude ~1e3 (scaled by 2^-10 or more inside) whose channels span three decades, so that
    their rows' norms do too."""
    s, r = maps(*shape, seed=seed)
    decades = torch.logspace(-3, 0, shape[1], dtype=torch.float64).reshape(1, -1, *([1] * (len(shape) - 2)))
    return 1e3 * s * decades, 1e3 * r * decades


def oracle_rows(x: torch.Tensor, aggregation: str, scope: str) -> torch.Tensor:
    """The rows `a_i` of METHODS §1 whose norms `eps` floors, by the oracle's definitions."""
    if aggregation == "gram":
        g = oracles.gram_batch(x) if scope == "batch" else oracles.gram_sample(x)
        return g.reshape(-1, g.shape[-1])
    a = oracles.aggregate(x, aggregation)
    return a.reshape(a.shape[0] * a.shape[1], -1)


def between_middle_norms(rows: torch.Tensor) -> float:
    """The geometric mean of the two middle row norms: half the rows lie below it, none on it."""
    norms = torch.linalg.vector_norm(rows, dim=1).sort().values
    middle = norms.shape[0] // 2
    return float((norms[middle - 1] * norms[middle]).sqrt())


@pytest.mark.parametrize(
    ("aggregation", "scope"),
    [("none", None), ("mean", None), ("sum", None), ("max", None), ("gram", "batch"), ("gram", "sample")],
)
def test_eps_floors_the_row_norms_in_the_inputs_units(aggregation: str, scope: str | None) -> None:
    """`s_i = <a_i, b_i> / (max(|a_i|, eps) · max(|b_i|, eps))` with `a_i` the rows of the unscaled maps, on
    every path (the maps are scaled by a power of two inside; the floor must follow): with `eps` between the
    middle ones of the student's row norms, half the rows are floored, and the oracle's value and gradient are met."""
    s, r = spread_maps(3, 4, 5, 2)
    eps = between_middle_norms(oracle_rows(s, aggregation, scope or "batch"))
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation=aggregation, distance="cos", gram_scope=scope, eps=eps),  # type: ignore[arg-type]
        lambda a, b: oracles.anti_transfer(a, b, aggregation, "cos", scope or "batch", eps=eps),
        s,
        r,
        rtol=1e-9,
        atol=1e-10,
    )


@pytest.mark.parametrize("distance", ["cos_squared", "cos"])
def test_reference_side_gets_no_gradient(distance: str) -> None:
    s, r = maps(2, 3, 4)
    r.requires_grad_(True)
    s.requires_grad_(True)
    (GRAD_SCALE * ntf.anti_transfer(s, r, distance=distance)).backward()  # type: ignore[arg-type]
    assert s.grad is not None and r.grad is None


def test_gram_scopes_equal_the_naive_definitions_to_1e_10() -> None:
    s, r = maps(3, 5, 4, 3, seed=4)
    for scope, naive in (("batch", oracles.gram_batch), ("sample", oracles.gram_sample)):
        torch.testing.assert_close(ntf.gram(s, gram_scope=scope), naive(s), rtol=0, atol=1e-10)  # type: ignore[arg-type]
        torch.testing.assert_close(
            ntf.anti_transfer(s, r, aggregation="gram", distance="cos", gram_scope=scope),  # type: ignore[arg-type]
            oracles.anti_transfer(s, r, "gram", "cos", scope),
            rtol=0,
            atol=1e-10,
        )


def test_max_ties_split_the_gradient_evenly_every_time() -> None:
    s = torch.tensor([[[2.0, 1.0], [2.0, 0.5], [0.0, 1.0]]], dtype=torch.float64)  # channels 0, 1 tie at [0]
    r = torch.tensor([[[1.0, 3.0], [0.5, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    grads = [
        value_and_grads(lambda a, b: ntf.anti_transfer(a, b, aggregation="max", distance="cos"), s, r)[1][0]
        for _ in range(3)
    ]
    assert all(torch.equal(grads[0], g) for g in grads)
    assert grads[0][0, 0, 0] == grads[0][0, 1, 0] != 0
    _, expected = value_and_grads(lambda a, b: oracles.anti_transfer(a, b, "max", "cos", "batch"), s, r)
    torch.testing.assert_close(grads[0], expected[0])


# --- hostile input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("aggregation", "distance", "scope"), [c for c in CASES if c[1] != "cka"])
def test_batch_of_one(aggregation: str, distance: str, scope: str | None) -> None:
    s, r = maps(1, 3, 4, positive=True)
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation=aggregation, distance=distance, gram_scope=scope),  # type: ignore[arg-type]
        lambda a, b: oracles.anti_transfer(a, b, aggregation, distance, scope or "batch"),
        s,
        r,
        rtol=1e-9,
        atol=1e-10,
    )


def test_cka_on_a_batch_of_one_is_a_clear_error() -> None:
    s, r = maps(1, 3, 4)
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        ntf.anti_transfer(s, r, aggregation="none", distance="cka")


@pytest.mark.parametrize(("aggregation", "distance", "scope"), CASES)
def test_zero_maps_give_a_defined_loss_and_finite_gradient(aggregation: str, distance: str, scope: str | None) -> None:
    """A zero map on either side: the oracle's value and gradients (a zero row's cosine is 0 through the floored
    norm); for `cka`, whose oracle is 0/0 there, the documented limit: 0, with a zero gradient."""
    s = torch.zeros(3, 4, 5, dtype=torch.float64)
    _, r = maps(3, 4, 5, positive=True)
    for student, reference in ((s, r), (s, s), (r, s)):
        value, grads = value_and_grads(
            lambda a, b: ntf.anti_transfer(a, b, aggregation=aggregation, distance=distance, gram_scope=scope),  # type: ignore[arg-type]
            student,
            reference,
        )
        constant = aggregation == "mul" or student is s or reference is s  # A(0) of "mul" is a constant map
        if distance == "cka" and constant:
            assert value == 0.0 and torch.equal(grads[0], torch.zeros_like(grads[0]))
            continue
        expected, expected_grads = value_and_grads(
            lambda a, b: oracles.anti_transfer(a, b, aggregation, distance, scope or "batch"), student, reference
        )
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-10)
        # "mul" at a zero map: ∂A/∂x = p·A/δ ≈ 1e7 carries rounding of the cosine's (zero) gradient to ~1e-9
        atol = 1e-7 if aggregation == "mul" else 1e-9
        torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-8, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("aggregation", "distance"), [("gram", "cos_squared"), ("mean", "cos"), ("none", "cka")])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype, aggregation: str, distance: str) -> None:
    s, r = maps(4, 3, 6, 6)
    s16, r16 = s.to(dtype), r.to(dtype)
    out = ntf.anti_transfer(s16, r16, aggregation=aggregation, distance=distance)  # type: ignore[arg-type]
    assert out.dtype == torch.float32
    expected = ntf.anti_transfer(s16.double(), r16.double(), aggregation=aggregation, distance=distance)  # type: ignore[arg-type]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ntf.anti_transfer(s.float(), r.float(), aggregation=aggregation, distance=distance)  # type: ignore[arg-type]
    torch.testing.assert_close(
        auto, ntf.anti_transfer(s.float(), r.float(), aggregation=aggregation, distance=distance)
    )  # type: ignore[arg-type]


def test_non_contiguous_and_channels_last_inputs() -> None:
    s, r = maps(3, 4, 5, 6)
    expected = ntf.anti_transfer(s, r)
    torch.testing.assert_close(
        ntf.anti_transfer(s.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)), expected
    )
    st, rt = s.transpose(2, 3).contiguous().transpose(2, 3), r.transpose(2, 3).contiguous().transpose(2, 3)
    assert not st.is_contiguous()
    torch.testing.assert_close(ntf.anti_transfer(st, rt), expected)
    torch.testing.assert_close(
        ntf.anti_transfer(s[:, ::2], r[:, ::2], aggregation="mean", distance="cos"),
        ntf.anti_transfer(s[:, ::2].contiguous(), r[:, ::2].contiguous(), aggregation="mean", distance="cos"),
    )


@pytest.mark.parametrize(("aggregation", "distance", "scope"), CASES)
def test_audio_features(aggregation: str, distance: str, scope: str | None) -> None:
    s, r = maps(3, 4, 7, positive=aggregation == "mul")  # (B, C, L)
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation=aggregation, distance=distance, gram_scope=scope),  # type: ignore[arg-type]
        lambda a, b: oracles.anti_transfer(a, b, aggregation, distance, scope or "batch"),
        s,
        r,
        atol=1e-10,
    )


@pytest.mark.parametrize(("aggregation", "distance", "scope"), [c for c in CASES if c[0] in ("none", "gram")])
def test_flat_features(aggregation: str, distance: str, scope: str | None) -> None:
    s, r = maps(5, 6)  # (B, D)
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation=aggregation, distance=distance, gram_scope=scope),  # type: ignore[arg-type]
        lambda a, b: oracles.anti_transfer(a, b, aggregation, distance, scope or "batch"),
        s,
        r,
        atol=1e-10,
    )


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max", "mul"])
def test_channel_reduction_of_flat_features_is_a_clear_error(aggregation: str) -> None:
    s, r = maps(5, 6, positive=True)
    with pytest.raises(ValueError, match=r"one number per sample.*aggregation='none' or 'gram', or distance='cka'"):
        ntf.anti_transfer(s, r, aggregation=aggregation, distance="cos")  # type: ignore[arg-type]
    torch.testing.assert_close(
        ntf.anti_transfer(s, r, aggregation=aggregation, distance="cka"),  # type: ignore[arg-type]
        oracles.anti_transfer(s, r, aggregation, "cka", "sample"),
    )


def test_shape_mismatch_names_layer_and_shapes_and_suggests_cka() -> None:
    s, r = torch.randn(4, 8, 5, 5), torch.randn(4, 16, 5, 5)
    with pytest.raises(
        ValueError,
        match=r"same shape for distance='cos_squared' and aggregation='gram' at layer 'layer3': "
        r"got \(4, 8, 5, 5\) and \(4, 16, 5, 5\); distance='cka'",
    ):
        ntf.anti_transfer(s, r, layer="layer3")
    with pytest.raises(
        ValueError, match=r"same batch size at layer 'x': got shapes \(4, 8, 5, 5\) and \(3, 16, 5, 5\)"
    ):
        ntf.anti_transfer(s, r[:3], aggregation="none", distance="cka", layer="x")
    value = ntf.anti_transfer(s, r, aggregation="none", distance="cka")
    assert 0.0 <= value.item() <= 1.0


def test_cka_with_batch_gram_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"gram_scope='sample'"):
        ntf.anti_transfer(
            torch.randn(3, 2, 2), torch.randn(3, 2, 2), aggregation="gram", distance="cka", gram_scope="batch"
        )


def test_invalid_options_name_the_argument() -> None:
    s, r = maps(2, 3, 4)
    with pytest.raises(ValueError, match=r"'aggregation' must be one of 'none', 'mean', 'sum', 'max', 'mul', 'gram'"):
        ntf.anti_transfer(s, r, aggregation="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'distance' must be one of"):
        ntf.anti_transfer(s, r, distance="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'nan_policy' must be one of 'raise', 'skip', 'propagate'"):
        ntf.anti_transfer(s, r, nan_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'reference' \(layer 'l1'\) must be a torch.Tensor"):
        ntf.anti_transfer(s, None, layer="l1")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_or_is_skipped(bad: float) -> None:
    s, r = maps(2, 3, 4)
    r[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"'reference' \(layer 'conv5'\) contain NaN or inf; pass nan_policy='skip'"):
        ntf.anti_transfer(s, r, layer="conv5")
    value, grads = value_and_grads(lambda a, b: ntf.anti_transfer(a, b, nan_policy="skip"), s, r)
    assert value.item() == 0.0 and torch.equal(grads[0], torch.zeros_like(s))
    assert not torch.isfinite(ntf.anti_transfer(s, r, nan_policy="propagate"))


def test_terms_report_similarity_and_student_norm() -> None:
    s, r = maps(3, 4, 5)
    terms = compute_anti_transfer_terms(s, r, AntiTransferOptions.resolve("gram", "cos_squared"))
    torch.testing.assert_close(terms.loss, terms.similarity**2)
    torch.testing.assert_close(terms.student_norm, s.reshape(3, -1).norm(dim=1).mean())
    assert not terms.similarity.requires_grad and not terms.student_norm.requires_grad
