"""The one preprocessing contract against torchvision's ToTensor + Normalize."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgecap.runtime.errors import DataError
from edgecap.runtime.preprocess import Preprocessing

transforms = pytest.importorskip("torchvision.transforms")


@pytest.mark.parametrize("shape", [(64, 64, 3), (90, 120, 3)])
def test_batch_matches_torchvision_normalize(shape):
    pre = Preprocessing(size=64)
    rng = np.random.default_rng(sum(shape))
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    want = np.stack([reference(cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)).numpy() for img in images])
    got = pre.batch(images)
    assert got.shape == (2, 3, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batch_refuses_a_grey_image():
    with pytest.raises(DataError, match="HxWx3"):
        Preprocessing(size=64).batch([np.zeros((64, 64), np.uint8)])
