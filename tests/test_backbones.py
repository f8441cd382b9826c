import numpy as np
import pytest
import skimage.data
import torch

from mofe_ood.backbones import (WeightsUnavailable, create_backbone, for_inference, pooled_features, preprocess,
                                preprocess_config)
from mofe_ood.params import ParamError

# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
IMAGENET_CATS = range(281, 286)


def test_package_weights_classify_a_real_cat_photo():
    model = create_backbone("tf_efficientnet_lite0", "package", 224).eval()
    x = preprocess(skimage.data.chelsea()[None], preprocess_config(model, 224))
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in IMAGENET_CATS, top
    assert probs[list(IMAGENET_CATS)].sum() > 0.5


def test_feature_model_drops_the_head_and_keeps_the_weights():
    full = create_backbone("tf_efficientnet_lite0", "package", 128)
    feats = create_backbone("tf_efficientnet_lite0", "package", 128, num_classes=0).eval()
    assert feats.num_features == 1280
    assert torch.equal(full.conv_stem.weight, feats.conv_stem.weight)
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        assert pooled_features(feats, x).shape == (2, 1280)


def test_folding_batchnorm_keeps_the_features_and_leaves_the_model_alone():
    model = create_backbone("tf_efficientnet_lite0", "package", 128, num_classes=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = for_inference(model, 128)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a bundle saves these
    x = preprocess(skimage.data.chelsea()[None].repeat(3, 0), preprocess_config(model, 128))
    with torch.inference_mode():
        want, got = pooled_features(model, x), pooled_features(folded, x)
    assert torch.allclose(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_folding_skips_a_batchnorm_that_does_not_follow_its_neighbour_and_models_without_one():
    class Branches(torch.nn.Module):  # conv and bn are neighbours as children, not in the data flow
        num_features = 4

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.bn.running_mean.fill_(3.0)
            self.bn.running_var.fill_(0.25)
            self.bn.eval()

        def forward_features(self, x):
            return self.conv(x) + self.bn(x[:, :1].expand(-1, 4, -1, -1))

        def forward_head(self, x, pre_logits=True):
            return x.mean((2, 3))

    model = Branches()
    assert for_inference(model, 8) is model
    vit = create_backbone("vit_small_patch14_dinov2", "random", 28, num_classes=0)
    assert for_inference(vit, 28) is vit  # nothing to fold: no copy made


@pytest.mark.parametrize("name, weights, size, match", [
    ("resnet9000", "package", 128, "extract.backbone: 'resnet9000'"),
    ("vit_small_patch14_dinov2", "package", 126, "only for tf_efficientnet_lite0"),
    ("vit_small_patch14_dinov2", "random", 128, "multiple of .* patch size 14; use 126 or 140"),
    ("tf_efficientnet_lite0", "/no/such/weights.safetensors", 128, "/no/such/weights.safetensors"),
])
def test_bad_backbone_params_name_the_value(name, weights, size, match):
    with pytest.raises(ParamError, match=match):
        create_backbone(name, weights, size)


def test_hub_weights_offline_fail_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="vit_small_patch14_dinov2.*local file"):
        create_backbone("vit_small_patch14_dinov2", "hub", 126)


def test_dinov2_loads_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    tiny = dict(depth=2, embed_dim=64, num_heads=2)
    source = create_backbone("vit_small_patch14_dinov2", "random", 56, **tiny)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("vit_small_patch14_dinov2", str(path), 56, **tiny).eval()
    source.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        np.testing.assert_array_equal(pooled_features(loaded, x).numpy(),
                                      pooled_features(source, x).numpy())
