"""The augmentations: the PIL views' probabilities, and the batched ops (images/augment.py)
against torchvision per image."""
import pytest
import torch


def test_two_view_transforms_carry_the_asymmetric_probabilities():
    from torchvision import transforms
    from images.datasets import PILGaussianBlur, two_view_transforms

    def probs(view):
        blur = [t.p for t in view.transforms if isinstance(t, transforms.RandomApply)
                and isinstance(t.transforms[0], PILGaussianBlur)]
        solarize = [t.p for t in view.transforms if isinstance(t, transforms.RandomSolarize)]
        return blur, solarize

    view1, view2 = two_view_transforms("folder", 224, 0.2)
    assert probs(view1) == ([1.0], [0.0]) and probs(view2) == ([0.1], [0.2])
    small1, small2 = two_view_transforms("cifar10", 32, 0.2)
    assert probs(small1) == ([], [0.0]) and probs(small2) == ([], [0.2])   # no blur at <= 64 px
    crop = [t for t in view1.transforms if isinstance(t, transforms.RandomResizedCrop)][0]
    assert crop.scale == (0.2, 1.0) and crop.size == (224, 224)



AUG_TOL = 1e-4  # max abs difference on [0, 1] images: well inside one uint8 step (1/255); float32 rounding gives ~1e-6


def aug_images(*shape, seed=0):
    """Noise images in [0, 1] on the uint8 grid: every pixel differs, so a shifted or wrongly
    weighted sample shows up as a large difference."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).float() / 255


def tv_jitter(img, factors, order):
    """ColorJitter's forward with given parameters: the four functional ops in the given order."""
    import torchvision.transforms.v2.functional as TF
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        img = ops[op](img, float(factors[op]))
    return img


def test_augment_resized_crop_and_flip_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    from images.augment import resized_crop
    x = aug_images(6, 3, 40, 48)
    boxes = torch.tensor([[0, 0, 40, 48],    # the whole image: downscale on both axes
                          [0, 0, 20, 30],    # top-left border
                          [25, 30, 15, 18],  # bottom-right border
                          [5, 7, 3, 4],      # tiny: upscale on both axes
                          [3, 0, 37, 9],     # left border: rows down, columns up
                          [0, 47, 40, 1]])   # the last column alone
    flip = torch.tensor([False, True, False, True, True, False])
    for size in (24, 64):
        out = resized_crop(x, boxes, flip, size)
        assert out.shape == (6, 3, size, size)
        for b in range(6):
            ref = TF.resized_crop(x[b], *boxes[b].tolist(), [size, size], antialias=True)
            ref = TF.horizontal_flip(ref) if flip[b] else ref
            assert (out[b] - ref).abs().max() < AUG_TOL, (size, b)
    # rows of weights normalised to 1 may sum to 1 + 1e-7: a white image must still stay in [0, 1]
    assert resized_crop(torch.ones_like(x), boxes, flip, 24).max() <= 1


def test_augment_jitter_ops_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    from images import augment
    x = aug_images(5, 3, 12, 10)
    x[0] = 0.0                                     # black: hue and saturation divide by max
    x[1, :, :4] = x[1, :1, :4]                     # grey pixels (max = min)
    x[2, 1] = x[2, 0]                              # ties R = G: the sector rule decides
    x[3, 2] = x[3, 1]                              # ties G = B
    factors = torch.tensor([[0.6, 0.6, 0.8, -0.1], [1.4, 1.4, 1.2, 0.1], [0.9, 1.3, 0.85, 0.05],
                            [1.2, 0.7, 1.1, -0.07], [1.0, 1.0, 1.0, 0.5]])
    cases = [(augment.adjust_brightness, TF.adjust_brightness), (augment.adjust_contrast, TF.adjust_contrast),
             (augment.adjust_saturation, TF.adjust_saturation), (augment.adjust_hue, TF.adjust_hue)]
    for i, (ours, theirs) in enumerate(cases):
        out = ours(x, factors[:, i])
        for b in range(5):
            assert (out[b] - theirs(x[b], float(factors[b, i]))).abs().max() < AUG_TOL, (theirs.__name__, b)


def test_augment_color_jitter_follows_each_images_order():
    from images.augment import color_jitter
    x = aug_images(6, 3, 10, 9, seed=1)
    factors = torch.tensor([[0.7, 1.3, 0.8, 0.08]] * 3 + [[1.35, 0.65, 1.2, -0.09]] * 3)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2], [1, 2, 0, 3]])
    apply = torch.tensor([True, True, True, True, True, False])
    out = color_jitter(x, factors, order, apply)
    for b in range(6):
        ref = tv_jitter(x[b], factors[b], order[b].tolist()) if apply[b] else x[b]
        assert (out[b] - ref).abs().max() < AUG_TOL, b
    assert torch.equal(out[5], x[5])  # not applied: untouched, bit for bit


def test_augment_grayscale_solarize_normalize_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    from images.augment import normalize, random_grayscale, solarize
    x = aug_images(4, 3, 8, 9, seed=2)
    apply = torch.tensor([True, False, True, False])
    gray, sol = random_grayscale(x, apply), solarize(x, apply)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = normalize(x, mean, std)
    for b in range(4):
        ref = TF.rgb_to_grayscale(x[b], num_output_channels=3) if apply[b] else x[b]
        assert (gray[b] - ref).abs().max() < AUG_TOL
        ref = TF.solarize(x[b], 128 / 255) if apply[b] else x[b]
        assert (sol[b] - ref).abs().max() < AUG_TOL
        assert (norm[b] - TF.normalize(x[b], mean, std)).abs().max() < AUG_TOL
    assert (sol[0] != x[0]).any() and (sol[0] == x[0]).any()  # both sides of the threshold


def test_augment_blur_matches_torchvision_with_a_sigma_per_image():
    import torchvision.transforms.v2.functional as TF
    from images.augment import blur_kernel_size, gaussian_blur
    assert [blur_kernel_size(s) for s in (28, 32, 64, 65, 96, 224)] == [0, 0, 0, 7, 9, 23]
    x = aug_images(3, 3, 20, 17, seed=3)
    sigma = torch.tensor([0.4, 1.8, 0.1])
    out = gaussian_blur(x, 9, sigma)
    for b in range(3):
        ref = TF.gaussian_blur(x[b], [9, 9], [float(sigma[b])] * 2)
        assert (out[b] - ref).abs().max() < AUG_TOL, b
    assert (out[0] - out[1]).abs().max() > 0.05  # the two sigmas really differ


def tv_pipeline(img, p, b, size, mean, std, crop):
    """One image through the torchvision functional ops with the parameters of image b; also
    returns the image before solarize, whose threshold makes a 1e-7 difference a jump."""
    import torchvision.transforms.v2.functional as TF
    x = TF.to_dtype(img, torch.float32, scale=True)
    if crop:
        x = TF.resized_crop(x, *p.box[b].tolist(), [size, size], antialias=True)
        x = TF.horizontal_flip(x) if p.flip[b] else x
    x = x.expand(3, -1, -1)  # Grayscale(3) of a one-channel image
    x = tv_jitter(x, p.factors[b], p.order[b].tolist()) if p.jitter[b] else x
    x = TF.rgb_to_grayscale(x, num_output_channels=3) if p.gray[b] else x
    k = 2 * (size // 20) + 1
    x = TF.gaussian_blur(x, [k, k], [float(p.sigma[b])] * 2) if p.blur[b] and size > 64 else x
    before = x
    x = TF.solarize(x, 128 / 255) if p.solarize[b] else x
    return TF.normalize(x, mean, std), before


@pytest.mark.parametrize("channels, crop", [(3, True), (1, False)])
def test_augment_pipeline_matches_torchvision_per_image(channels, crop):
    import dataclasses
    from images.augment import apply_params, sample_params
    B, size, mean, std = 8, 80, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    H, W = (96, 88) if crop else (size, size)
    images = torch.randint(0, 256, (B, channels, H, W), generator=torch.Generator().manual_seed(4),
                           dtype=torch.uint8)
    p = sample_params(B, H, W, 0.08, 0.5, 0.5, torch.Generator().manual_seed(5))
    i = torch.arange(B)  # sampled boxes, factors, orders and sigmas; coins set to mix every case
    p = dataclasses.replace(p, flip=i % 2 == 0, jitter=i % 4 != 3, gray=i % 3 == 1, blur=i % 4 < 2,
                            solarize=i % 3 != 2)
    out = apply_params(images, p, size, mean, std, crop=crop)
    assert out.shape == (B, 3, size, size) and out.dtype == torch.float32
    std_t = torch.tensor(std)[:, None, None]
    for b in range(B):
        ref, before = tv_pipeline(images[b], p, b, size, mean, std, crop)
        # a rounding difference may cross the threshold; ~1/256 of the pixels lie right on it
        # where no op moved them (uint8 128)
        near = (before - 128 / 255).abs() < 1e-5
        assert near.float().mean() < 0.01
        assert (((out[b] - ref) * std_t).abs() * ~near).max() < AUG_TOL, b


def test_augment_random_choice_frequencies():
    from images.augment import VIEW1, VIEW2, sample_params
    n, g = 4000, torch.Generator().manual_seed(6)
    assert VIEW1 == dict(blur_p=1.0, solarize_p=0.0) and VIEW2 == dict(blur_p=0.1, solarize_p=0.2)
    p1 = sample_params(n, 224, 224, 0.08, generator=g, **VIEW1)
    p2 = sample_params(n, 224, 224, 0.08, generator=g, **VIEW2)
    for p in (p1, p2):
        for flag, freq in ((p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2)):
            assert abs(flag.float().mean() - freq) < 0.03
        for op in range(4):  # every op equally often at every position
            assert ((p.order == op).float().mean(dim=0) - 0.25).abs().max() < 0.03
        assert (p.order.sort(dim=1).values == torch.arange(4)).all()  # permutations
        for i, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            f = p.factors[:, i]
            assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
        assert 0.1 <= p.sigma.min() < 0.11 and 1.99 < p.sigma.max() <= 2.0
    assert p1.blur.all() and not p1.solarize.any()              # view 1: blur p 1, solarize p 0
    assert abs(p2.blur.float().mean() - 0.1) < 0.03 and abs(p2.solarize.float().mean() - 0.2) < 0.03


def test_augment_crop_boxes_follow_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop
    from images.augment import sample_crop
    n, g = 4000, torch.Generator().manual_seed(7)
    top, left, h, w = sample_crop(n, 224, 160, 0.08, g).T.double()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 160).all()
    # the rounding of h and w to pixels moves area and ratio a little past the sampled ranges
    area, ratio = h * w / (224 * 160), w / h
    assert area.min() > 0.08 * 0.97 and area.max() <= 1 and area.min() < 0.09
    assert ratio.min() > 0.75 * 0.97 and ratio.max() < 4 / 3 / 0.97
    # the corner is uniform over all the places the box fits, both ends included
    assert (top == 0).any() and (left == 0).any() and (top == 224 - h).any() and (left == 160 - w).any()
    # the same distribution as torchvision's sampler (the first fitting attempt favours small boxes)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        img = torch.zeros(1, 224, 160)
        tv = torch.tensor([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)])
    tv_area, tv_ratio = tv[:, 2] * tv[:, 3] / (224 * 160), tv[:, 3] / tv[:, 2]
    assert abs(area.mean() - tv_area.double().mean()) < 0.03 and abs(ratio.mean() - tv_ratio.double().mean()) < 0.03
    # no attempt fits a 4 px band: RandomResizedCrop's fallback, the central crop of ratio 3/4 or 4/3
    assert (sample_crop(50, 4, 200, 0.9, g) == torch.tensor([0, 97, 4, 5])).all()
    assert (sample_crop(50, 200, 4, 0.9, g) == torch.tensor([97, 0, 5, 4])).all()


def test_augment_two_views_are_the_asymmetric_pair_and_seeded():
    from images.augment import VIEW1, VIEW2, apply_params, augment, sample_params, two_views
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    a = torch.randint(0, 256, (4, 3, 80, 80), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    v1, v2 = two_views(a, 72, 0.2, mean, std, gen(0))
    g = gen(0)  # the same draws: view 1 with VIEW1's probabilities, then view 2 with VIEW2's
    p1 = sample_params(4, 80, 80, 0.2, generator=g, **VIEW1)
    p2 = sample_params(4, 80, 80, 0.2, generator=g, **VIEW2)
    assert torch.equal(v1, apply_params(a, p1, 72, mean, std)) and torch.equal(v2, apply_params(a, p2, 72, mean, std))
    w1, w2 = two_views(a, 72, 0.2, mean, std, gen(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)                      # same seed: same bits
    u1, u2 = two_views(a, 72, 0.2, mean, std, gen(1))
    assert not torch.equal(v1, u1) and not torch.equal(v2, u2)              # another seed: other views
    # crop=False: a pair of batches, one per view (the workers' two crops)
    b = a.flip(0)
    v1, v2 = two_views((a, b), 80, 0.2, mean, std, gen(2), crop=False)
    g = gen(2)
    assert torch.equal(v1, augment(a, 80, 0.2, mean=mean, std=std, generator=g, crop=False, **VIEW1))
    assert torch.equal(v2, augment(b, 80, 0.2, mean=mean, std=std, generator=g, crop=False, **VIEW2))


def test_augment_output_shape_grey_level_and_bad_input():
    import dataclasses
    from images.augment import apply_params, augment, sample_params, two_views
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    rgb = torch.randint(0, 256, (4, 3, 28, 28), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    views = two_views(rgb, 32, 0.08, mean, std, torch.Generator().manual_seed(0))
    assert all(v.shape == (4, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    # one channel (Fashion-MNIST) = the same image in all three channels
    one = augment(rgb[:, :1], 32, 0.08, 1.0, 0.2, mean, std, torch.Generator().manual_seed(1))
    three = augment(rgb[:, :1].expand(-1, 3, -1, -1), 32, 0.08, 1.0, 0.2, mean, std,
                    torch.Generator().manual_seed(1))
    assert torch.equal(one, three)
    # constant grey: crop, flip, blur, solarize (100 < 128) and grayscale keep it; jitter is off
    grey = torch.full((6, 3, 90, 90), 100, dtype=torch.uint8)
    p = sample_params(6, 90, 90, 0.08, 1.0, 1.0, torch.Generator().manual_seed(2))
    out = apply_params(grey, dataclasses.replace(p, jitter=torch.zeros(6, dtype=torch.bool)), 80, mean, std)
    expected = (100 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert (out - expected[:, None, None]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="uint8"):
        augment(rgb.float(), 32, 0.08, 1.0, 0.0, mean, std, torch.Generator())
    with pytest.raises(ValueError, match="final size 32x32"):
        augment(rgb, 32, 0.08, 1.0, 0.0, mean, std, torch.Generator(), crop=False)

