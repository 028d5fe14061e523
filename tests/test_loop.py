"""The shared training loop: resume, metrics and extra state, fingerprints, clipping, divergence."""

from __future__ import annotations

import math

import pytest
import torch

from personalign.errors import ValidationError
from personalign.training.loop import LoopConfig, train_loop

TARGET = torch.tensor([1.0, -2.0, 3.0])


def _problem() -> tuple[dict[str, torch.nn.Parameter], object]:
    """Least squares towards TARGET over 6 noisy items; returns (params, batch_loss)."""
    w = torch.nn.Parameter(torch.zeros(3))
    items = TARGET + 0.1 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0))

    def batch_loss(idx: list[int]) -> torch.Tensor:
        return ((items[idx] - w) ** 2).sum(-1).mean()

    return {"w": w}, batch_loss


def test_resume_equals_an_uninterrupted_run_and_keeps_metrics_and_extra(tmp_path):
    params, loss = _problem()
    straight = train_loop(
        params,
        6,
        loss,
        LoopConfig(epochs=3, batch_size=2, learning_rate=0.1),
        after_epoch=lambda e: {"val": float(e)},
    )
    expected = params["w"].detach().clone()

    params, loss = _problem()
    folder = str(tmp_path / "ckpt")
    extra = {"note": "first"}
    train_loop(
        params,
        6,
        loss,
        LoopConfig(epochs=2, batch_size=2, learning_rate=0.1, checkpoint_dir=folder),
        after_epoch=lambda e: {"val": float(e)},
        fingerprint={"data": 6},
        extra=extra,
    )
    params, loss = _problem()  # a fresh process: new parameters, the checkpoint on disk
    restored = {"note": None}
    resumed = train_loop(
        params,
        6,
        loss,
        LoopConfig(epochs=3, batch_size=2, learning_rate=0.1, checkpoint_dir=folder),
        after_epoch=lambda e: {"val": float(e)},
        fingerprint={"data": 6},
        extra=restored,
    )
    assert (resumed.resumed_from, resumed.epochs_run) == (2, 3)
    torch.testing.assert_close(params["w"].detach(), expected)
    assert resumed.epoch_loss == pytest.approx(straight.epoch_loss)
    assert resumed.metrics == straight.metrics == {"val": [0.0, 1.0, 2.0]}
    assert restored == {"note": "first"}


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    folder = str(tmp_path / "ckpt")
    params, loss = _problem()
    train_loop(params, 6, loss, LoopConfig(epochs=1, checkpoint_dir=folder), fingerprint={"data": 6})
    params, loss = _problem()
    with pytest.raises(ValidationError, match="checkpoint_dir") as err:
        train_loop(params, 6, loss, LoopConfig(epochs=2, checkpoint_dir=folder), fingerprint={"data": 5})
    assert "new checkpoint_dir" in str(err.value)


def test_gradients_are_clipped_to_max_grad_norm(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(tensors, max_norm, *args, **kwargs):
        tensors = list(tensors)
        out = real(tensors, max_norm, *args, **kwargs)
        seen.append(
            (max_norm, float(torch.linalg.vector_norm(torch.stack([t.grad.norm() for t in tensors]))))
        )
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    params, loss = _problem()
    train_loop(params, 6, loss, LoopConfig(epochs=1, batch_size=2, max_grad_norm=0.5))
    assert len(seen) == 3 and all(limit == 0.5 and norm <= 0.5 + 1e-6 for limit, norm in seen)
    seen.clear()
    params, loss = _problem()
    train_loop(params, 6, loss, LoopConfig(epochs=1, batch_size=2))
    assert seen == []


def test_a_diverging_loss_is_a_typed_error():
    w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValidationError, match="lower the learning rate") as err:
        train_loop({"w": w}, 2, lambda idx: (w * math.inf).sum(), LoopConfig(epochs=1))
    assert err.value.field == "learning_rate"
    with pytest.raises(ValidationError, match="diverge"):
        train_loop(
            {"w": w},
            2,
            lambda idx: (w - 1).pow(2).sum(),
            LoopConfig(epochs=1),
            after_epoch=lambda e: {"val": math.nan},
        )


def test_progress_is_per_step_with_the_running_loss(capsys):
    params, loss = _problem()
    train_loop(
        params, 6, loss, LoopConfig(epochs=3, batch_size=4, learning_rate=0.1, progress=True, name="toy")
    )
    err = capsys.readouterr().err
    assert "toy: 100%" in err and "6/6" in err  # 3 epochs of ceil(6 / 4) = 2 steps
    assert "epoch=3/3" in err and "loss=" in err
    params, loss = _problem()
    train_loop(params, 6, loss, LoopConfig(epochs=1, batch_size=4))
    assert capsys.readouterr().err == ""  # progress=False draws nothing


def test_checkpoints_are_safetensors_and_json_and_old_pickles_are_refused(tmp_path):
    import json

    from safetensors.torch import load_file

    folder = tmp_path / "ckpt"
    params, loss = _problem()
    train_loop(
        params,
        6,
        loss,
        LoopConfig(epochs=2, batch_size=4, checkpoint_dir=str(folder)),
        fingerprint={"data": (6, "toy")},
    )
    state = json.loads((folder / "loop_state.json").read_text())
    assert (
        state["epoch"] == 2
        and state["state_dir"] == "epoch-2"
        and state["params"] == ["w"]
        and state["fingerprint"] == {"data": [6, "toy"]}
    )
    torch.testing.assert_close(
        load_file(str(folder / "epoch-2" / "trainable.safetensors"))["w"], params["w"].detach()
    )
    assert not list(folder.glob("epoch-1"))  # older epochs are dropped
    torch.load(folder / "epoch-2" / "optimizer.bin", weights_only=True)  # no pickled objects
    params, loss = _problem()  # a tuple in the fingerprint reads back as a list: still the same run
    resumed = train_loop(
        params,
        6,
        loss,
        LoopConfig(epochs=2, batch_size=4, checkpoint_dir=str(folder)),
        fingerprint={"data": (6, "toy")},
    )
    assert resumed.resumed_from == 2
    old = tmp_path / "old"
    old.mkdir()
    (old / "loop_state.pt").write_bytes(b"pickled")
    with pytest.raises(ValidationError, match="old pickled format") as err:
        train_loop(params, 6, loss, LoopConfig(epochs=1, checkpoint_dir=str(old)))
    assert err.value.field == "checkpoint_dir"


@pytest.mark.parametrize(("n", "processes"), [(5, 2), (4, 2), (1, 2), (7, 3), (2, 4)])
def test_share_splits_a_batch_like_accelerate(n, processes):
    """accelerate's ``split_between_processes``: contiguous parts, the first ``n % processes`` one longer."""
    from personalign.training.loop import share

    batch = list(range(10, 10 + n))
    parts = [share(batch, i, processes) for i in range(processes)]
    assert sum(parts, []) == batch
    size, extra = divmod(n, processes)
    assert [len(p) for p in parts] == [size + (i < extra) for i in range(processes)]
    assert share(batch, 0, 1) == batch
