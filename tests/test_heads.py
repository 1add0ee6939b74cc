"""Policy heads, flow matching and the mixture-of-experts action expert (heads.py)."""

import pytest
import torch
import torch.nn.functional as F

import backbones
import heads


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_flow_time_follows_beta_1p5_1():
    g = torch.Generator().manual_seed(0)
    t = heads.sample_flow_time((200_000,), g)
    assert t.min() >= 0.001 and t.max() <= 1.0
    # oracle: torch's own Beta sampler, rescaled like pi0 (t = Beta(1.5, 1) * 0.999 + 0.001)
    torch.manual_seed(0)
    ref = torch.distributions.Beta(1.5, 1.0).sample((200_000,)) * 0.999 + 0.001
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(torch.quantile(t, q) - torch.quantile(ref, q)) < 0.01


def test_flow_conventions_exact_velocity_gives_zero_loss_and_exact_samples():
    """With the true velocity of a single target a, v(x_t, t) = (x_t - a) / t, the pi0 loss (x_t = t·eps +
    (1-t)·a, target eps - a) is zero and 10 Euler steps from t = 1 land exactly on a (straight paths)."""
    a = torch.rand(3, 4, 7) * 2 - 1  # (B, L, 7)
    mask = torch.ones(3, 4, dtype=torch.bool)

    def exact(x_t, t):
        return (x_t - a) / t[..., None, None]
    loss, _ = heads.flow_loss(exact, a, mask, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-9
    x = heads.flow_sample(exact, a.shape, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, a, atol=1e-5, rtol=0)
    # a wrong convention (target a - eps) must give a large loss
    loss_bad, _ = heads.flow_loss(lambda x_t, t: -exact(x_t, t), a, mask, torch.Generator().manual_seed(0))
    assert loss_bad.item() > 0.5


def test_flow_loss_ignores_masked_steps():
    a = torch.zeros(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, False, False]])

    def v(x_t, t):  # exact on valid steps, garbage on masked ones
        out = x_t / t[..., None, None]
        return out + (~mask)[..., None].float() * 100
    loss, _ = heads.flow_loss(v, a, mask, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-9


def _fixed_feats(B=4, H=1, d=32, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, H, d, generator=g)
    pose = torch.rand(B, H, L, 6, generator=g) * 1.6 - 0.8
    grip = torch.randint(0, 2, (B, H, L, 1), generator=g).float() * 2 - 1
    return feats, torch.cat([pose, grip], -1), torch.ones(B, H, L, dtype=torch.bool)


def test_flow_head_sampling_is_seeded_and_overfits():
    torch.manual_seed(0)
    head = heads.PolicyHead(32, 3, "mlp", "flow", width=64, out_hidden=(128, 128))
    feats, act, mask = _fixed_feats()
    s1 = head.predict(feats, torch.Generator().manual_seed(7))
    s2 = head.predict(feats, torch.Generator().manual_seed(7))
    s3 = head.predict(feats, torch.Generator().manual_seed(8))
    assert torch.equal(s1, s2) and not torch.allclose(s1, s3)

    def eval_loss():  # fixed noise and times, so the before/after numbers are comparable
        g = torch.Generator().manual_seed(123)
        return sum(head.loss(feats, act, mask, generator=g)[0].item() for _ in range(8)) / 8
    before = eval_loss()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(2500):
        loss, _ = head.loss(feats, act, mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # The flow loss keeps an irreducible-in-practice part at small t (the exact velocity (x_t - a) / t needs a
    # 1/t gain), so the criterion is a 20x drop plus samples landing on the target.
    assert after < before / 20, (before, after)
    sample = head.predict(feats, torch.Generator().manual_seed(5))
    assert (sample - act).abs().mean() < 0.1, (sample - act).abs().mean()


@pytest.mark.parametrize("trunk", ["mlp", "lstm", "gpt"])
def test_heads_are_causal_in_time_and_bounded(trunk):
    torch.manual_seed(0)
    head = heads.PolicyHead(16, 5, trunk, "regress", width=32, layers=2, heads=4, max_frames=6, out_hidden=(32,))
    x = torch.randn(2, 6, 16)
    pose, grip = head(x)
    assert pose.shape == (2, 6, 5, 6) and grip.shape == (2, 6, 5)
    assert pose.abs().max() <= 1.0  # tanh
    y = x.clone()
    y[:, 3:] += torch.randn(2, 3, 16)  # change frames 3..5
    pose2, grip2 = head(y)
    torch.testing.assert_close(pose2[:, :3], pose[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(grip2[:, :3], grip[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(pose2[:, 3:], pose[:, 3:])


def test_gpt_head_rejects_longer_history_than_built_for():
    head = heads.PolicyHead(16, 2, "gpt", width=32, layers=1, heads=2, max_frames=4, out_hidden=(32,))
    with pytest.raises(ValueError, match="at most 4 frames"):
        head(torch.randn(1, 5, 16))


def test_unknown_head_is_a_clear_error():
    with pytest.raises(ValueError, match="'mlp', 'lstm' or 'gpt'"):
        heads.PolicyHead(16, 2, "transformer")


def _micro_backbone():
    torch.manual_seed(0)
    return backbones.TinyVLM(image_size=16, patch=8, vision_dim=16, vision_layers=1, vision_heads=2,
                             d=32, layers=2, heads=2).eval()


def test_expert_equals_one_joint_attention_over_vl_and_action_tokens():
    """Reference: the pi0 block written out as ONE sequence [VL tokens, action tokens] per layer, each stream
    with its own weights, one softmax with the mask 'VL rows see VL causally, action rows see everything'."""
    bb = _micro_backbone()
    torch.manual_seed(1)
    expert = heads.ActionExpert(bb, chunk=3, objective="regress", width=24).eval()
    B, T = 2, 7
    vl = torch.randn(B, T, 32)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 5:] = False  # row 1 has 2 padding tokens at the end
    pos_vl = torch.arange(T).expand(B, T)
    pos_act = valid.sum(1, keepdim=True) + torch.arange(3)
    _, cache = bb(vl, pos_vl)
    got = expert.run(expert.queries[None].expand(B, -1, -1), cache, valid, pos_act)

    x_vl, x_act = vl, expert.queries[None].expand(B, -1, -1) + expert.slot_pos  # + the per-slot embedding
    allowed = torch.zeros(B, T + 3, T + 3, dtype=torch.bool)
    allowed[:, :T, :T] = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed[:, T:, :T] = valid[:, None, :]
    allowed[:, T:, T:] = True
    for blk, lay in zip(bb.blocks, expert.layers):
        q1, k1, v1 = blk.qkv(x_vl, pos_vl)
        q2, k2, v2 = lay.qkv(x_act, pos_act, bb.rope)
        q, k, v = (torch.cat(p, 2) for p in ((q1, q2), (k1, k2), (v1, v2)))
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        y = F.softmax(att.masked_fill(~allowed[:, None], float("-inf")), -1) @ v  # (B, h, T+3, hd)
        y = y.transpose(1, 2).reshape(B, T + 3, -1)
        x_vl = x_vl + blk.o(y[:, :T])
        x_vl = x_vl + blk.mlp(blk.norm2(x_vl))
        x_act = x_act + lay.o(y[:, T:])
        x_act = x_act + lay.ffn(lay.norm2(x_act))
    ref = expert.out(expert.norm(x_act))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the VL stream of that joint pass is exactly the plain VLM's
    hidden, _ = bb(vl, pos_vl)
    torch.testing.assert_close(bb.norm(x_vl), hidden, atol=1e-5, rtol=1e-5)


def test_expert_ignores_padding_and_sees_the_vl_tokens():
    bb = _micro_backbone()
    expert = heads.ActionExpert(bb, chunk=2, objective="regress").eval()
    vl = torch.randn(1, 6, 32)
    pos = torch.arange(6)[None]
    valid = torch.tensor([[True] * 4 + [False] * 2])
    pos_act = torch.tensor([[4, 5]])
    q = expert.queries[None]
    out = expert.run(q, bb(vl, pos)[1], valid, pos_act)
    vl2 = vl.clone()
    vl2[:, 4:] = torch.randn(1, 2, 32)  # change only the padding
    torch.testing.assert_close(expert.run(q, bb(vl2, pos)[1], valid, pos_act), out)
    vl2[:, 1] += 1.0  # change a real VL token
    assert not torch.allclose(expert.run(q, bb(vl2, pos)[1], valid, pos_act), out)
