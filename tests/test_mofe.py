import numpy as np
import pytest
import timm
import torch

from mofe_ood import mofe
from mofe_ood.mixup import DynamicBetaMixup
from mofe_ood.backbones import create_backbone, for_inference, pooled_features, trunk_of
from mofe_ood.mofe import EXPERTS, BlockExpert, MLPExpert, MoFE, class_groups, register_expert
from mofe_ood.training.phases import phase_loss, set_trainable, trainable_parameters

GROUPS = [0, 1, 0, 2, 1, 2]  # 6 classes, 3 experts


def randomised(model, seed=0):
    """Every parameter random (MLPExpert's zero-initialised last layer would hide gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def make(router="hard", top_k=1, dim=8):
    torch.manual_seed(0)
    return randomised(MoFE(dim, 6, GROUPS, expert="mlp", hidden_features=16, router=router, top_k=top_k))


# ---------------------------------------------------------------- groups

def test_class_groups_cluster_class_means_into_non_empty_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    means = np.repeat(centres, 2, axis=0) + rng.normal(size=(6, 16)) * 0.1  # classes 2k, 2k+1 are alike
    for method in mofe.GROUP_METHODS:
        groups = class_groups(means, 3, method, seed=0)
        assert sorted(np.bincount(groups)) == [2, 2, 2]
        assert all(groups[2 * k] == groups[2 * k + 1] for k in range(3))
        assert groups[0] == 0  # numbered by first class
    assert (class_groups(means, 6, seed=0) == np.arange(6)).all()
    assert (class_groups(means, 1) == 0).all()


def test_given_group_table_is_validated():
    means = np.eye(4)
    assert class_groups(means, 2, table=[0, 1, 1, 0]).tolist() == [0, 1, 1, 0]
    for bad in ([0, 1, 1], [0, 0, 0, 0], [0, 1, 2, 0], [0.5, 1, 1, 0]):
        with pytest.raises(ValueError, match="group table"):
            class_groups(means, 2, table=bad)
    with pytest.raises(ValueError, match="between 1 and the 4 classes"):
        class_groups(means, 5)


# ---------------------------------------------------------------- routing

def test_hard_routing_sends_each_sample_through_exactly_one_expert():
    model = make().eval()
    x = torch.randn(40, 8)
    seen = []
    hooks = [e.register_forward_hook(lambda m, inp, out, i=i: seen.append((i, len(inp[0]))))
             for i, e in enumerate(model.experts)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    assert sum(n for _, n in seen) == len(x)  # no sample computed twice, none skipped
    gates = out["gates"]
    assert ((gates == 0) | (gates == 1)).all() and (gates.sum(1) == 1).all()
    chosen = gates.argmax(1)
    predicted_group = torch.as_tensor(GROUPS)[out["router_logits"].argmax(1)]
    assert torch.equal(chosen, predicted_group)  # the predicted class's group
    with torch.no_grad():
        for i in range(len(x)):
            assert torch.allclose(out["feature"][i], model.experts[chosen[i]](x[i:i + 1])[0], atol=1e-6)
    assert torch.allclose(out["logits"], out["feature"] @ model.classifier_weights()[0].T
                          + model.classifier_weights()[1], atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_soft_gates_sum_to_one_over_top_k(top_k):
    model = make("soft", top_k).eval()
    x = torch.randn(30, 8)
    with torch.no_grad():
        out = model(x)
        gates = out["gates"]
        assert torch.allclose(gates.sum(1), torch.ones(30))
        assert ((gates > 0).sum(1) == top_k).all() and (gates >= 0).all()
        mixture = sum(gates[:, e, None] * model.experts[e](x) for e in range(3))
        assert torch.allclose(out["feature"], mixture, atol=1e-5)


def test_forced_and_oracle_routing():
    model = make().eval()
    x, y = torch.randn(10, 8), torch.arange(10) % 6
    with torch.no_grad():
        assert torch.allclose(model(x, expert=2)["feature"], model.experts[2](x))
        oracle = model(x, route_labels=y)["gates"].argmax(1)
    assert torch.equal(oracle, torch.as_tensor(GROUPS)[y])


def test_mlp_expert_starts_as_layernorm_and_copies_are_independent():
    expert = MLPExpert(8, 16)
    x = torch.randn(5, 8)
    assert torch.allclose(expert(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)
    model = make()
    model.copy_expert(0)
    with torch.no_grad():
        assert torch.equal(model.experts[1](x), model.experts[0](x))
        model.experts[1].fc1.weight.add_(1)
        assert not torch.equal(model.experts[1](x), model.experts[0](x))


# ---------------------------------------------------------------- training phases

PHASE_CASES = [  # phase, expert, router mode, modules that must get gradients
    ("base", None, "hard", ["experts.0.", "classifier."]),
    ("experts", 1, "hard", ["experts.1.", "other_heads.1."]),
    ("router", None, "hard", ["router."]),
    ("router", None, "soft", ["router."]),
    ("joint", None, "hard", ["experts.", "router.", "classifier."]),
]


@pytest.mark.parametrize("phase, expert, router, trained", PHASE_CASES)
def test_gradients_reach_only_the_phase_parameters(phase, expert, router, trained):
    model = make(router, 3 if router == "soft" else 1)
    model.train()
    set_trainable(model, trainable_parameters(model, phase, expert))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 6
    if phase == "experts":
        y = y[torch.as_tensor(GROUPS)[y] == expert]
    x = torch.randn(len(y), 8)
    x_other = torch.randn(len(y), 8)
    mix = DynamicBetaMixup(6, 0.1, 1.0, label_smoothing=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = phase_loss(model, phase, x, y, expert=expert, x_other=x_other, mixup=mix, generator=gen,
                      label_smoothing=0.1)
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        expected = any(name.startswith(t) for t in trained)
        if phase == "joint" and name.startswith("experts."):
            expected = True
        if phase == "joint" and name.startswith("other_heads."):
            expected = False
        if expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), name


def test_phase_errors():
    model = make()
    with pytest.raises(ValueError, match="expert index"):
        trainable_parameters(model, "experts")
    with pytest.raises(ValueError, match="phase 'nope'"):
        trainable_parameters(model, "nope")


# ---------------------------------------------------------------- block experts (the paper's)

@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2,
                             embed_dim=64, num_heads=2, num_classes=0).eval()


def test_block_expert_reproduces_the_last_block_at_init(vit):
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)
        tokens = trunk_of(vit, x, 1)
        expert = BlockExpert(64, init_from=vit).eval()
        assert torch.allclose(expert(tokens), want, atol=1e-5)
        model = MoFE(64, 4, [0, 1, 1, 0], expert="block", init_from=vit).eval()
        out = model(tokens)  # every expert is the block: the routed feature is the backbone's
        assert torch.allclose(out["feature"], want, atol=1e-5)
        assert out["router_logits"].shape == (3, 4)
    assert expert.top[0] is not vit.blocks[-1]
    with torch.no_grad():
        expert.top[0].mlp.fc1.weight.add_(1.0)
    assert not torch.equal(expert.top[0].mlp.fc1.weight, vit.blocks[-1].mlp.fc1.weight)
    with pytest.raises(ValueError, match="needs init_from"):
        BlockExpert(64)


def test_a_cnn_block_expert_on_the_cached_trunk_gives_the_frozen_pooled_feature():
    """EfficientNet-Lite0 (real weights) at 128 px: extract's cache (the folded model's blocks[5]
    output in float16) through a copy of the unfolded top = the frozen pooled feature to ~2e-4."""
    net = create_backbone("tf_efficientnet_lite0", "package", 128, num_classes=0).eval()
    folded = for_inference(net, 128)
    x = torch.randn(6, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pooled_features(net, x)
        trunk = trunk_of(folded, x, 1).half()
        assert trunk.shape == (6, 192, 4, 4)
        expert = BlockExpert(1280, init_from=net).eval()
        got = expert(trunk.float())
        assert (got - want).abs().max() <= 2e-4 * want.abs().max()
        two = BlockExpert(1280, init_from=net, top_blocks=2).eval()  # the split point is a parameter
        assert torch.allclose(two(trunk_of(net, x, 2)), want, atol=1e-5)
        model = MoFE(1280, 7, [0, 1, 0, 0, 2, 2, 1], expert="block", init_from=net, router_dim=192).eval()
        out = model(trunk.float())  # every expert is the top: the routed feature is the backbone's
        assert (out["feature"] - want).abs().max() <= 2e-4 * want.abs().max()
        assert out["router_logits"].shape == (6, 7) and out["gates"].sum(1).eq(1).all()
    assert expert.top[0] is not net.blocks[-1]
    with pytest.raises(ValueError, match="between 1 and 6"):
        BlockExpert(1280, init_from=net, top_blocks=7)


def test_expert_kinds_are_a_registry_with_one_signature():
    assert EXPERTS["mlp"] is MLPExpert and EXPERTS["block"] is BlockExpert
    assert not MLPExpert.reads_tokens and BlockExpert.reads_tokens
    with pytest.raises(ValueError, match="registered already"):
        register_expert("mlp")(BlockExpert)
    with pytest.raises(ValueError, match="reads_tokens"):
        register_expert("no_flag")(torch.nn.Identity)
    assert "no_flag" not in EXPERTS
    with pytest.raises(ValueError, match="not one of mlp, block"):
        MoFE(8, 4, [0, 1, 0, 1], expert="transformer")
    with pytest.raises(ValueError, match="'block' experts read the ViT trunk's tokens"):
        MoFE(8, 4, [0, 1, 0, 1], expert="block", stem_blocks=1)
