"""The action arithmetic (data.py, heads.py, vla.py): statistics, normalization, tokenizer, losses, execution."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from data import compute_action_stats, normalize_action, unnormalize_action
from heads import continuous_action_loss, discrete_action_loss
from vla import ActionExecutor, ActionTokenizer

rng = np.random.default_rng(0)


def random_actions(n, gripper=(-1.0, 1.0)):
    pose = rng.normal(0, 0.3, size=(n, 6)) * np.array([1, 2, 0.5, 1, 1, 3])
    grip = rng.choice(gripper, size=(n, 1))
    return np.concatenate([pose, grip], 1).astype(np.float32)


# ---- statistics ----

def test_stats_exact_small():
    a = random_actions(1000)
    s = compute_action_stats(a)
    assert set(s) >= {"q01", "q99", "mean", "std", "min", "max"}
    for k in ("q01", "q99", "mean", "std", "min", "max"):
        assert len(s[k]) == 7 and all(isinstance(x, float) for x in s[k])
    np.testing.assert_allclose(s["q01"], np.quantile(a, 0.01, axis=0), atol=1e-6)
    np.testing.assert_allclose(s["q99"], np.quantile(a, 0.99, axis=0), atol=1e-6)
    np.testing.assert_allclose(s["mean"], a.mean(0), atol=1e-6)
    np.testing.assert_allclose(s["std"], a.std(0), atol=1e-5)
    np.testing.assert_allclose(s["min"], a.min(0))
    np.testing.assert_allclose(s["max"], a.max(0))


def test_stats_streaming_matches_exact(monkeypatch):
    # force the streaming histogram path on a moderately large array and compare with exact quantiles
    a = random_actions(300_000)
    monkeypatch.setattr(data, "EXACT_QUANTILE_MAX_ROWS", 1000)
    monkeypatch.setattr(data, "STATS_CHUNK_ROWS", 50_000)
    s = compute_action_stats(a)
    rng_ = a.max(0) - a.min(0)
    for q, key in ((0.01, "q01"), (0.99, "q99")):
        err = np.abs(np.asarray(s[key]) - np.quantile(a, q, axis=0))
        assert (err <= 1e-3 * rng_ + 1e-12).all(), (key, err / rng_)
    np.testing.assert_allclose(s["mean"], a.mean(0), atol=1e-5)


def test_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        compute_action_stats(np.zeros(7))
    with pytest.raises(ValueError, match="0 actions"):
        compute_action_stats(np.zeros((0, 7)))
    a = random_actions(10)
    a[3, 2] = np.nan
    with pytest.raises(ValueError, match="row 3, dim 2"):
        compute_action_stats(a)


# ---- normalization ----

@pytest.mark.parametrize("mode", ["quantile", "bounds"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_normalize_round_trip(mode, backend):
    a = random_actions(500)
    s = compute_action_stats(a)
    x = torch.from_numpy(a) if backend == "torch" else a
    n = normalize_action(x, s, mode=mode)
    assert type(n) is type(x) and n.shape == x.shape
    n_np = n.numpy() if backend == "torch" else n
    assert (np.abs(n_np) <= 1 + 1e-6).all()
    assert set(np.unique(n_np[:, 6])) <= {-1.0, 1.0}
    back = unnormalize_action(n, s, mode=mode)
    back = back.numpy() if backend == "torch" else back
    # inside the clamp range the round trip is exact; outside it returns the clamp bound
    if mode == "quantile":
        lo, hi = np.array(s["q01"][:6]), np.array(s["q99"][:6])
    else:
        lo, hi = -0.65 * np.ones(6), 0.65 * np.ones(6)
    np.testing.assert_allclose(back[:, :6], np.clip(a[:, :6], lo, hi), atol=1e-5)
    np.testing.assert_array_equal(back[:, 6], a[:, 6])


def test_normalize_maps_quantiles_to_unit_interval_eq6():
    s = {"q01": [-2.0] * 7, "q99": [2.0] * 7}
    a = np.array([[-2, 2, 0, -5, 5, 1, 1]], dtype=np.float32)
    np.testing.assert_allclose(normalize_action(a, s), [[-1, 1, 0, -1, 1, 0.5, 1]])


def test_official_bounds_mode():
    a = np.array([[0.65, -0.65, 0.325, 1.0, -1.0, 0.0, -1.0]], dtype=np.float32)
    n = normalize_action(a, {}, mode="bounds")
    np.testing.assert_allclose(n, [[1, -1, 0.5, 1, -1, 0, -1]], atol=1e-6)


def test_gripper_conventions_and_leading_shapes():
    s = {"q01": [-1.0] * 7, "q99": [1.0] * 7}
    a01 = np.zeros((2, 3, 4, 7), np.float32)
    a01[..., 6] = np.array([0, 1, 1, 0])
    apm = a01.copy()
    apm[..., 6] = np.array([-1, 1, 1, -1])
    n01, npm = normalize_action(a01, s), normalize_action(apm, s)
    assert n01.shape == (2, 3, 4, 7)
    np.testing.assert_array_equal(n01[..., 6], npm[..., 6])
    np.testing.assert_array_equal(n01[0, 0, :, 6], [-1, 1, 1, -1])


def test_constant_dimension_does_not_divide_by_zero():
    a = random_actions(100)
    a[:, 1] = 0.3
    s = compute_action_stats(a)
    n = normalize_action(a, s)
    assert np.isfinite(n).all() and (n[:, 1] == 0).all()
    np.testing.assert_allclose(unnormalize_action(n, s)[:, 1], 0.3, atol=1e-6)


def test_nan_raises_naming_dimension():
    s = {"q01": [-1.0] * 7, "q99": [1.0] * 7}
    a = np.zeros((4, 7), np.float32)
    a[2, 4] = np.inf
    with pytest.raises(ValueError, match=r"\[4\]"):
        normalize_action(a, s)
    with pytest.raises(ValueError, match=r"\[4\]"):
        unnormalize_action(torch.from_numpy(a), s)
    with pytest.raises(KeyError, match="q01"):
        normalize_action(np.zeros((1, 7)), {"mean": [0] * 7})


# ---- discrete tokenizer ----

@pytest.mark.parametrize("vocab", [32000, 257216])
def test_tokenizer_id_range(vocab):
    tok = ActionTokenizer(vocab)
    assert tok.id_max == vocab - 10 - 1 and tok.id_min == vocab - 10 - 256
    a = np.linspace(-1, 1, 10001)
    ids = tok.encode(a)
    assert ids.min() == tok.id_min and ids.max() == tok.id_max
    assert len(np.unique(ids)) == 256
    # special tokens at the end of the vocabulary and ordinary tokens at the start are untouched
    assert (ids < vocab - 10).all() and (ids >= vocab - 266).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_tokenizer_round_trip_within_half_bin(backend):
    tok = ActionTokenizer(32000)
    a = np.concatenate([np.linspace(-1, 1, 4097), rng.uniform(-1, 1, 1000), [-1, 1, 0]])
    x = torch.from_numpy(a) if backend == "torch" else a
    back = tok.decode(tok.encode(x))
    back = back.numpy() if backend == "torch" else back
    assert np.abs(back - a).max() <= tok.bin_width / 2 + 1e-6
    # out-of-range actions clip to the end bins
    assert tok.encode(np.array([5.0]))[0] == tok.id_max and tok.encode(np.array([-5.0]))[0] == tok.id_min


def test_tokenizer_rejects_non_action_ids():
    tok = ActionTokenizer(1000)
    with pytest.raises(ValueError, match="action range"):
        tok.decode(np.array([5]))
    with pytest.raises(ValueError, match="too small"):
        ActionTokenizer(200)


# ---- losses ----

def test_continuous_loss_matches_hand_computation():
    torch.manual_seed(0)
    pose, logit = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4)
    target = torch.cat([torch.randn(2, 3, 4, 6) * 2, torch.randint(0, 2, (2, 3, 4, 1)) * 2.0 - 1], -1)
    mask = torch.rand(2, 3, 4) > 0.3
    for kind in ("huber", "mse"):
        loss, m = continuous_action_loss(pose, logit, target, mask, lam=0.01, kind=kind)
        # brute force over the valid entries
        total_pose, total_bce, count = 0.0, 0.0, 0
        for idx in mask.nonzero().tolist():
            p, t = pose[tuple(idx)], target[tuple(idx)]
            d = (p - t[:6]).abs()
            err = torch.where(d < 1, 0.5 * d ** 2, d - 0.5) if kind == "huber" else d ** 2
            total_pose += err.mean().item()
            y = 1.0 if t[6] > 0 else 0.0
            z = logit[tuple(idx)].item()
            total_bce += -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
            count += 1
        expected = total_pose / count + 0.01 * total_bce / count
        assert abs(loss.item() - expected) < 1e-5, kind
        assert abs(m["loss_gripper"] - total_bce / count) < 1e-5


def test_continuous_loss_ignores_masked_entries_and_backprops():
    pose = torch.zeros(1, 2, 6, requires_grad=True)
    logit = torch.zeros(1, 2, requires_grad=True)
    target = torch.zeros(1, 2, 7)
    target[0, 1, :6] = 100.0  # garbage in the masked entry
    mask = torch.tensor([[True, False]])
    loss, _ = continuous_action_loss(pose, logit, target, mask)
    loss.backward()
    assert abs(loss.item() - 0.01 * np.log(2)) < 1e-6
    assert pose.grad[0, 1].abs().sum() == 0


def test_discrete_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 50), torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    loss, m = discrete_action_loss(logits, ids, mask)
    expected = F.cross_entropy(logits[mask], ids[mask])
    assert abs(loss.item() - expected.item()) < 1e-6
    assert 0 <= m["acc_tokens"] <= 1


# ---- execution strategies ----

def test_chunk_execution_replans_after_n_exec():
    ex = ActionExecutor("chunk", n_exec=3)
    calls, out = 0, []
    for t in range(7):
        if ex.needs_chunk():
            calls += 1
            ex.add_chunk(np.full((5, 7), float(t)) + np.arange(5)[:, None])
        out.append(ex.next_action()[0])
    assert calls == 3  # at t = 0, 3, 6
    assert out == [0, 1, 2, 3, 4, 5, 6]
    ex = ActionExecutor("chunk")
    ex.add_chunk(np.zeros((4, 7)))
    assert sum(not ex.needs_chunk() or ex.next_action() is None for _ in range(4)) == 4


def test_first_execution_uses_newest_a0():
    ex = ActionExecutor("first")
    for t in range(4):
        assert ex.needs_chunk()
        ex.add_chunk(np.full((3, 7), 10.0 * t))
        assert ex.next_action()[0] == 10.0 * t


def test_ensemble_matches_brute_force_weighted_average():
    L, T, k = 4, 9, 0.3
    chunks = [rng.normal(size=(L, 7)) for _ in range(T)]
    chunks[2][:] = 0.0  # an all-zero prediction is a valid action and must count
    ex = ActionExecutor("ensemble", k=k)
    for t in range(T):
        assert ex.needs_chunk()
        ex.add_chunk(chunks[t])
        got = ex.next_action()
        # brute force: every chunk predicted at step s <= t with t - s < L, oldest first
        preds = [chunks[s][t - s] for s in range(T) if s <= t and t - s < L]
        w = np.array([np.exp(-k * i) for i in range(len(preds))])
        expected = (w[:, None] * np.array(preds)).sum(0) / w.sum()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_executor_errors_and_reset():
    with pytest.raises(ValueError):
        ActionExecutor("bogus")
    ex = ActionExecutor("chunk")
    with pytest.raises(RuntimeError):
        ex.next_action()
    ex.add_chunk(np.ones((2, 7)))
    ex.reset()
    assert ex.needs_chunk() and ex.t == 0
