
import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from PIL import Image

from hashdistill.data import build_dataset
from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig


@pytest.mark.parametrize("dataset", ["synthetic", "digits", pytest.param("fashion-mnist", marks=needs_fashion_mnist)])
def test_splits_are_disjoint_and_shaped(dataset):
    cfg = DataConfig(dataset=dataset, image_size=24, train_limit=None if dataset != "fashion-mnist" else 2000)
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    x, y = train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert len(val) > 0 and len(test) > 0
    # grayscale repeated to 3 channels
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert 0 <= y < len(train.class_names)


def test_validation_split_is_fixed_and_disjoint():
    cfg = DataConfig(dataset="digits")
    a, b = build_dataset(cfg, "val"), build_dataset(cfg, "val")
    assert torch.equal(a.images, b.images)
    train = build_dataset(cfg, "train")
    train_rows = {bytes(img.numpy()) for img in train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in a.images[:50])


@needs_fashion_mnist
def test_ood_split_holds_only_heldout_classes():
    cfg = DataConfig(dataset="fashion-mnist", in_classes=list(range(8)), ood_classes=[8, 9], test_limit=500)
    test, ood = build_dataset(cfg, "test"), build_dataset(cfg, "ood_test")
    assert test.class_names[-1] == "sneaker" and len(test.class_names) == 8
    assert int(test.labels.max()) == 7 and bool((ood.labels == -1).all())
    assert ood.class_names == ["bag", "ankle boot"]


def test_missing_fashion_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)) as err:
        build_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)), "train")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    for stem in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"junk")
    with pytest.raises(UserError, match="idx"):
        build_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)), "train")


def test_imagefolder_skips_corrupt_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.2)
    train = build_dataset(cfg, "train")
    assert "skipped 1 unreadable image(s): broken.png" in capsys.readouterr().err
    x, y = train[0]
    assert x.shape == (3, 16, 16) and train.class_names == ["cat", "dog"]


def test_empty_imagefolder_is_a_user_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="no readable images"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), "train")


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(UserError, match="not a CIFAR-10 batch"):
        build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), "train")
    assert not (tmp_path / "pwned").exists()


def _reference_shift_flip(images: torch.Tensor, seed: int, max_shift: int = 2) -> torch.Tensor:
    """The same draws as random_shift_flip (one view id per image: dy = v // 10, dx = v // 2 % 5, flip = v odd),
    applied one image at a time."""
    torch.manual_seed(seed)
    b, _, h, w = images.shape
    views = torch.randint(0, 50, (b,))
    dy, dx, flip = views // 10, views // 2 % 5, views % 2 == 1
    out = []
    for i in range(b):
        padded = torch.nn.functional.pad(images[i:i + 1], (max_shift,) * 4, mode="replicate")[0]
        crop = padded[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_batch_augmentation_shifts_and_flips_each_image_reproducibly():
    from hashdistill.data import random_shift_flip

    images = torch.randn(64, 3, 12, 10)
    torch.manual_seed(5)
    augmented = random_shift_flip(images)
    torch.testing.assert_close(augmented, _reference_shift_flip(images, 5), rtol=0, atol=0)
    torch.manual_seed(5)
    assert torch.equal(random_shift_flip(images), augmented)  # seeded: a resumed epoch replays it
    assert not torch.equal(augmented, images)
    pixels = (images * 40 + 128).clamp(0, 255).to(torch.uint8)  # uint8 batches, as the trainer hands them over
    torch.manual_seed(6)
    assert torch.equal(random_shift_flip(pixels), _reference_shift_flip(pixels, 6))
    for channels in (1, 3):  # channels-last strides (how a one-channel batch often arrives) give the same crops
        strided = pixels[:, :channels].contiguous(memory_format=torch.channels_last)
        torch.manual_seed(7)
        assert torch.equal(random_shift_flip(strided), _reference_shift_flip(strided.contiguous(), 7))


def test_the_fifty_views_are_every_shift_flipped_or_not():
    from hashdistill.data import NUM_VIEWS, shift_flip_views

    image = torch.randn(1, 3, 9, 11)
    views = shift_flip_views(image.expand(NUM_VIEWS, -1, -1, -1), torch.arange(NUM_VIEWS))
    assert len({tuple(v.flatten().tolist()) for v in views}) == NUM_VIEWS == 50
    assert torch.equal(views[24], image[0])  # view 24: no shift (dy = dx = 2 in the padded frame), no flip
    assert torch.equal(views[25], image[0].flip(-1))
    padded = torch.nn.functional.pad(image, (2,) * 4, mode="replicate")[0]
    assert torch.equal(views[2 * 10 + 4 * 2], padded[:, 2:11, 4:15])  # view 28: down 0, right 2


def test_batched_fetch_equals_item_by_item():
    from torch.utils.data import default_collate

    dataset = build_dataset(DataConfig(dataset="synthetic", image_size=16), "train")
    indices = [5, 0, 17, 3]
    batch = dataset.get_batch(indices)
    reference = default_collate([dataset[i] for i in indices])
    assert torch.equal(batch[0], reference[0]) and torch.equal(batch[1], reference[1])


@needs_fashion_mnist
def test_augmented_batches_travel_as_uint8_and_are_normalised_after_the_shift():
    from hashdistill.data import batch_augmentation, random_shift_flip

    dataset = build_dataset(DataConfig(dataset="fashion-mnist", image_size=16, augment=True, train_limit=300),
                            "train")
    torch.manual_seed(3)
    batch = dataset.get_batch(list(range(40)))
    pixels, labels, views = batch
    assert pixels.dtype == torch.uint8 and pixels.shape[1] == 1  # a quarter of the bytes, one channel
    assert views.shape == (40,) and 0 <= views.min() and views.max() < 50  # each image's view travels with it
    augmented, same_labels, same_views = batch_augmentation(dataset)(batch)
    torch.manual_seed(3)  # shift and flip commute with the per-channel normalisation
    reference = random_shift_flip(torch.stack([dataset[i][0] for i in range(40)]))
    assert augmented.shape == (40, 3, 16, 16) and torch.equal(augmented, reference)
    assert same_labels is labels and same_views is views
    plain = build_dataset(DataConfig(dataset="fashion-mnist", image_size=16, train_limit=300), "train")
    assert batch_augmentation(plain) is None and plain.get_batch([0])[0].dtype == torch.float32


def test_image_folder_training_items_are_uint8_and_normalise_like_timms_float_transform(tmp_path):
    """The folder's training items leave the loader as uint8 (normalised per batch on the device); under the same
    seeds the normalised batch is timm's usual ToTensor + Normalize transform of the same crops, to float32
    rounding (the normalisation is x * scale + bias, as the exported graph's BatchNormalization computes it)."""
    import random

    from hashdistill.data import batch_augmentation
    from hashdistill.data.imagefolder import train_transform
    from hashdistill.imagefiles import read_rgb

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (30, 24 + 4 * i, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, augment=True)
    train = build_dataset(cfg, "train")
    items = list(range(len(train)))
    torch.manual_seed(0), random.seed(0)
    pixels = torch.stack([train[i][0] for i in items])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(items), 3, 16, 16)
    assert {train[i][2] for i in items} == {-1}  # free augmentation: no named view
    usual = train_transform(cfg, train.transform.mean, train.transform.std, uint8=False)
    torch.manual_seed(0), random.seed(0)
    reference = torch.stack([usual(read_rgb(train.paths[i])) for i in items])
    normalised = batch_augmentation(train)([pixels])[0]
    assert normalised.shape == reference.shape and (normalised - reference).abs().max() < 1e-6
    plain = build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16), "train")
    assert batch_augmentation(plain) is None and plain[0][0].dtype == torch.float32


def test_a_view_bank_gives_each_image_the_same_k_views_in_any_process_and_order(tmp_path):
    import random

    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (30, 28, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, augment=True,
                     auto_augment="rand-m9-mstd0.5-inc1")  # RandAugment draws from numpy too
    bank = build_dataset(cfg, "train").with_view_bank(3)
    assert bank.num_views == 3 and build_dataset(cfg, "train").num_views is None
    first = [[bank.view(i, v) for v in range(3)] for i in range(len(bank))]
    assert not torch.equal(first[0][0], first[0][1])  # three different views
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # another state of every generator
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for i in reversed(range(len(bank))):
        for v in range(3):
            assert torch.equal(bank.view(i, v), first[i][v])
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # left untouched
    assert np.array_equal(np.random.get_state()[1], state[2])
    pixels, label, view = bank[2]
    assert 0 <= view < 3 and torch.equal(pixels, first[2][view]) and label == bank.labels[2]
    subset = bank.subset(np.array([2, 0]))  # a subset (the labelled images) keeps each image's views
    assert torch.equal(subset.view(0, 1), first[2][1])
