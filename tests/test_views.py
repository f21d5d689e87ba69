
import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from fdcache.store.views import View, ViewPolicy, sample_view, sample_views


def test_same_inputs_give_the_same_view_in_any_order():
    a = [sample_view(7, 1, i, 640, 480) for i in range(50)]
    b = [sample_view(7, 1, i, 640, 480) for i in reversed(range(50))][::-1]
    assert a == b
    assert sample_view(7, 2, 3, 640, 480) != sample_view(7, 1, 3, 640, 480) or \
        sample_view(7, 2, 4, 640, 480) != sample_view(7, 1, 4, 640, 480)


def test_views_depend_on_global_seed_seed_and_index():
    base = np.stack([sample_view(0, 0, i, 500, 400).as_array() for i in range(20)])
    other_global = np.stack([sample_view(1, 0, i, 500, 400).as_array() for i in range(20)])
    other_seed = np.stack([sample_view(0, 1, i, 500, 400).as_array() for i in range(20)])
    assert not np.array_equal(base, other_global)
    assert not np.array_equal(base, other_seed)


@pytest.mark.parametrize("w,h", [(640, 480), (37, 1000), (1000, 37), (1, 1), (3, 2)])
def test_views_stay_inside_the_image(w, h):
    for i in range(300):
        y, x, vh, vw, flip = sample_view(3, 0, i, w, h)
        assert 0 <= x and 0 <= y and vw >= 1 and vh >= 1
        assert x + vw <= w and y + vh <= h
        assert flip in (0, 1)


def test_fallback_is_torchvisions_central_crop_clamped_to_the_ratio():
    # An impossible scale range forces all 10 tries to fail.
    policy = ViewPolicy(scale=(1.0, 1.0), ratio=(2.0, 3.0), flip_p=0.0)
    assert sample_view(0, 0, 0, 100, 100, policy) == View(y=25, x=0, h=50, w=100, flip=0)
    policy = ViewPolicy(scale=(1.0, 1.0), ratio=(0.25, 0.5), flip_p=0.0)
    assert sample_view(0, 0, 0, 100, 100, policy) == View(y=0, x=25, h=100, w=50, flip=0)


def test_full_policy_is_the_whole_image_unflipped():
    assert sample_view(0, 5, 9, 321, 123, ViewPolicy(kind="full")) == View(0, 0, 123, 321, 0)


def test_sample_views_matches_sample_view():
    w = np.array([100, 200, 300]); h = np.array([50, 60, 70])
    v = sample_views(4, 2, w, h, start=10)
    assert v.dtype == np.int32 and v.shape == (3, 5)
    for k in range(3):
        assert tuple(v[k]) == sample_view(4, 2, 10 + k, int(w[k]), int(h[k]))


def _stats(views: np.ndarray, W: int, H: int) -> dict[str, np.ndarray]:
    y, x, h, w = (views[:, i].astype(float) for i in range(4))
    return {"area": w * h / (W * H), "log_ratio": np.log(w / h),
            "cx": (x + w / 2) / W, "cy": (y + h / 2) / H}


def test_distribution_matches_torchvision_random_resized_crop():
    W, H, n = 500, 375, 20000
    ours = np.stack([sample_view(0, 0, i, W, H).as_array() for i in range(n)])
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    theirs = np.concatenate([theirs, np.zeros((n, 1), int)], axis=1)  # (i, j, h, w) = (y, x, h, w)
    a, b = _stats(ours, W, H), _stats(theirs, W, H)
    qs = np.linspace(0.05, 0.95, 19)
    for key in a:
        # Two-sample comparison of quantiles; 20k draws put the sampling error near 0.01.
        diff = np.abs(np.quantile(a[key], qs) - np.quantile(b[key], qs)).max()
        spread = np.quantile(b[key], 0.95) - np.quantile(b[key], 0.05)
        assert diff < 0.03 * spread, (key, diff, spread)
    assert abs(ours[:, 4].mean() - 0.5) < 0.02
