"""`AntiTransferLoss`: layer matching, weights applied once, logging terms, nothing of the reference kept."""

from __future__ import annotations

import gc
import weakref

import oracles
import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses.functional.anti_transfer import AntiTransferOptions, compute_anti_transfer_terms


def feats(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer2": torch.randn(4, 3, 5, 5, generator=g), "layer3": torch.randn(4, 6, 2, 2, generator=g)}


def test_weighted_sum_over_layers_applies_weight_once() -> None:
    s, r = feats(0), feats(1)
    loss = ntl.AntiTransferLoss(weight=2.5, layer_weights={"layer3": 0.5})
    expected = 2.5 * (ntf.anti_transfer(s["layer2"], r["layer2"]) + 0.5 * ntf.anti_transfer(s["layer3"], r["layer3"]))
    torch.testing.assert_close(loss(s, r), expected)


LAYER_TERMS = ("loss", "similarity", "student_norm")


def test_two_tensors_form_one_layer() -> None:
    s, r = feats(0)["layer2"], feats(1)["layer2"]
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos")
    torch.testing.assert_close(loss(s, r), ntf.anti_transfer(s, r, aggregation="mean", distance="cos"))
    assert set(loss.last_terms) == {"loss", "features/loss", "features/similarity", "features/student_norm"}


def test_last_terms_hold_detached_logging_scalars() -> None:
    s, r = feats(0), feats(1)
    for t in s.values():
        t.requires_grad_(True)
    loss = ntl.AntiTransferLoss(weight=3.0)
    total = loss(s, r)
    terms = loss.last_terms
    assert set(terms) == {"loss"} | {f"{layer}/{t}" for layer in ("layer2", "layer3") for t in LAYER_TERMS}
    assert all(not v.requires_grad and v.dim() == 0 for v in terms.values())
    for name in ("layer2", "layer3"):
        raw = compute_anti_transfer_terms(s[name], r[name], AntiTransferOptions.resolve("gram", "cos_squared"))
        torch.testing.assert_close(terms[f"{name}/similarity"], raw.similarity)
        torch.testing.assert_close(terms[f"{name}/loss"], 3.0 * raw.loss.detach())
        torch.testing.assert_close(terms[f"{name}/student_norm"], raw.student_norm)
    torch.testing.assert_close(total.detach(), terms["layer2/loss"] + terms["layer3/loss"])
    torch.testing.assert_close(terms["loss"], total.detach())


def test_reference_is_not_kept_alive_and_gets_no_gradient() -> None:
    s, r = feats(0), feats(1)
    s["layer2"].requires_grad_(True)
    r["layer2"].requires_grad_(True)
    loss = ntl.AntiTransferLoss()
    out = loss(s, r)
    out.backward()
    assert s["layer2"].grad is not None and r["layer2"].grad is None
    probe = weakref.ref(r["layer2"])
    del r, out
    gc.collect()
    assert probe() is None


def test_layer_mismatch_names_the_keys() -> None:
    s, r = feats(0), feats(1)
    del r["layer3"]
    r["layer4"] = s["layer3"]
    with pytest.raises(ValueError, match=r"student only: \['layer3'\]; reference only: \['layer4'\]"):
        ntl.AntiTransferLoss()(s, r)
    with pytest.raises(TypeError, match=r"both be tensors or both be dicts"):
        ntl.AntiTransferLoss()(s, s["layer2"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'layer_weights' names layer\(s\) \['layer9'\]"):
        ntl.AntiTransferLoss(layer_weights={"layer9": 1.0})(s, feats(1))


def test_shape_mismatch_names_the_layer() -> None:
    s, r = feats(0), feats(1)
    r["layer3"] = torch.randn(4, 8, 2, 2)
    with pytest.raises(ValueError, match=r"at layer 'layer3': got \(4, 6, 2, 2\) and \(4, 8, 2, 2\)"):
        ntl.AntiTransferLoss()(s, r)
    cka = ntl.AntiTransferLoss(aggregation="none", distance="cka")(s, r)  # widths may differ: the sum over layers
    expected = sum(oracles.anti_transfer(s[k], r[k], "none", "cka", "sample") for k in s)
    torch.testing.assert_close(cka.double(), expected, rtol=1e-5, atol=1e-6)


def test_invalid_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"'distance' must be one of"):
        ntl.AntiTransferLoss(distance="euclid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"gram_scope='sample'"):
        ntl.AntiTransferLoss(aggregation="gram", distance="cka", gram_scope="batch")


def test_repr_shows_the_configuration() -> None:
    assert repr(ntl.AntiTransferLoss()) == (
        "AntiTransferLoss(aggregation='gram', distance='cos_squared', gram_scope='batch', weight=1.0)"
    )


def test_layer_losses_are_weighted_contributions_that_add_up_to_the_returned_loss() -> None:
    s, r = feats(0), feats(1)
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos", weight=2.5, layer_weights={"layer3": 0.2})
    total = loss(s, r)
    terms = loss.last_terms
    torch.testing.assert_close(terms["loss"], total.detach())
    torch.testing.assert_close(terms["layer2/loss"] + terms["layer3/loss"], terms["loss"])
    raw = ntf.anti_transfer(s["layer3"], r["layer3"], aggregation="mean", distance="cos")
    torch.testing.assert_close(terms["layer3/loss"], 2.5 * 0.2 * raw)  # the weighted contribution, not the raw loss


CONFIGURATIONS = [("gram", "cos_squared"), ("mean", "cos"), ("max", "cos_squared"), ("none", "cka"), ("gram", "cka")]


@pytest.mark.parametrize(("aggregation", "distance"), CONFIGURATIONS)
def test_a_step_makes_no_host_sync_and_compiles_without_a_graph_break(aggregation: str, distance: str) -> None:
    from helpers import count_syncs

    s, r = feats(0), feats(1)
    for t in s.values():
        t.requires_grad_(True)
    loss = ntl.AntiTransferLoss(aggregation=aggregation, distance=distance, weight=2.0)  # type: ignore[arg-type]

    def step() -> None:
        loss(s, r).backward()

    step()  # warm-up
    syncs = count_syncs(step)  # the NaN check deferred as on a GPU
    assert syncs.total == 0, dict(syncs.counts)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(s, r)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


def test_a_generator_you_pass_resumes_with_the_module() -> None:
    import io

    def module() -> ntl.AntiTransferLoss:
        return ntl.AntiTransferLoss(
            aggregation="stochastic_pairwise", distance="cos", generator=torch.Generator().manual_seed(3)
        )

    g = torch.Generator().manual_seed(0)
    s, r = torch.randn(4, 12, 3, 3, generator=g), torch.randn(4, 12, 3, 3, generator=g)
    uninterrupted = module()
    for _ in range(3):
        uninterrupted(s, r)
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    expected = [uninterrupted(s, r) for _ in range(5)]
    resumed = module()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(resumed(s, r), value) for value in expected)  # the same windows drawn
    # a checkpoint without the generator's state (written before it was saved) loads as it did
    module().load_state_dict({})
    assert ntl.AntiTransferLoss().state_dict()["_extra_state"] == {}
