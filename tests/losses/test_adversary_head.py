"""`HeadAdam`, the adversary's own optimizer: `torch.optim.Adam`'s update, with its state in a `state_dict`."""

from __future__ import annotations

import pytest
import torch

from negtransfer_losses.losses._adversary_head import HeadAdam


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_fifty_steps_are_torch_adams(dtype: torch.dtype, tolerance: float) -> None:
    generator = torch.Generator().manual_seed(0)
    start = {
        "w": torch.randn(5, 4, generator=generator, dtype=dtype),
        "b": torch.randn(4, generator=generator, dtype=dtype),
    }
    target = {name: torch.randn(p.shape, generator=generator, dtype=dtype) for name, p in start.items()}

    def gradient(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: 2 * (params[name] - target[name]) ** 3 for name in params}  # not Adam-scale invariant

    optimizer = HeadAdam(list(start.items()), lr=3e-2)
    proposal = optimizer.propose(start, gradient, 50)
    reference = {name: p.clone().requires_grad_() for name, p in start.items()}
    adam = torch.optim.Adam(reference.values(), lr=3e-2)
    for _ in range(50):
        for name, p in reference.items():
            p.grad = gradient({n: q.detach() for n, q in reference.items()})[name]
        adam.step()
    for name, p in reference.items():
        torch.testing.assert_close(proposal[0][name], p.detach(), rtol=0, atol=tolerance)
    assert int(proposal[3]) == 50
    # the state is written only where the commit says so, and then it is Adam's
    targets = {name: p.clone() for name, p in start.items()}
    optimizer.commit(proposal, targets, torch.tensor(False))
    assert int(optimizer.step) == 0 and all(torch.equal(targets[n], start[n]) for n in start)
    optimizer.commit(proposal, targets, torch.tensor(True))
    assert int(optimizer.step) == 50
    state = adam.state_dict()["state"]
    for i in range(len(optimizer.names)):  # the names in the order the reference optimizer holds them
        torch.testing.assert_close(optimizer.get_buffer(f"exp_avg_{i}"), state[i]["exp_avg"], rtol=0, atol=tolerance)


def test_its_state_is_saved_and_an_older_checkpoint_loads_with_a_warning() -> None:
    optimizer = HeadAdam([("w", torch.zeros(3))], lr=1e-2)
    assert set(optimizer.state_dict()) == {"step", "exp_avg_0", "exp_avg_sq_0"}
    fresh = HeadAdam([("w", torch.zeros(3))], lr=1e-2)
    with pytest.warns(UserWarning, match="its steps start afresh"):
        fresh.load_state_dict({})
