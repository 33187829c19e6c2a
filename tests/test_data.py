"""Data loaders on small files made here, and the resumable sharded batch iterator."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from cfdg.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    BatchIterator,
    ImageData,
    load_dataset,
)
from cfdg.errors import UserError


def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(data)


def make_fashion_files(directory, n=12, split="train"):
    directory.mkdir(parents=True, exist_ok=True)
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")}
    stems["test"] = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(directory / f"{stems[split][0]}.gz", images)
    write_idx(directory / f"{stems[split][1]}.gz", labels)
    return images, labels


def toy_data(n=20, classes=4, size=4):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size)
    labels = torch.arange(n) % classes
    return ImageData(images.contiguous(), labels, [str(i) for i in range(classes)], "toy")


# Fashion-MNIST.


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_system_files():
    train = load_dataset("fashion-mnist")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.class_names[0] == "T-shirt/top"
    assert train.class_names[9] == "Ankle boot"
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_fashion_mnist_torchvision_layout(tmp_path):
    images, labels = make_fashion_files(tmp_path / "FashionMNIST" / "raw")
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == labels.tolist()
    assert data.class_names == FASHION_MNIST_CLASSES


def test_fashion_mnist_plain_files_and_resize(tmp_path):
    make_fashion_files(tmp_path, split="test")
    data = load_dataset("fashion-mnist", "test", data_dir=tmp_path, image_size=32)
    assert data.images.shape == (12, 1, 32, 32)


def test_fashion_mnist_missing_says_how(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_corrupt_header(tmp_path):
    make_fashion_files(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as file:
        file.write(b"\x00\x00\x0d\x03" + b"\x00" * 16)
    with pytest.raises(UserError, match="not a uint8 IDX file"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_truncated_body(tmp_path):
    make_fashion_files(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(UserError, match="12 images but"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


# Digits.


def test_digits_split_is_fixed_and_disjoint():
    train = load_dataset("digits")
    test = load_dataset("digits", "test")
    again = load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8)
    assert test.images.shape == (360, 1, 8, 8)
    assert torch.equal(test.images, again.images)
    assert int(train.images.max()) == 255
    assert int(train.images.min()) == 0
    assert torch.bincount(test.labels).min() >= 35  # stratified: 36 or 35 per class
    train_rows = {bytes(r) for r in train.images.flatten(1).numpy()}
    shared = sum(bytes(r) in train_rows for r in test.images.flatten(1).numpy())
    assert (
        shared < 10
    )  # a few digits are pixel-identical in the source; the split has no index twice


# Image folders.


def make_folder(root, sizes=((20, 12), (9, 9)), mode="RGB"):
    for name, color in (("cat", 40), ("ant", 200)):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new(mode, size, color if mode == "L" else (color, 0, 0)).save(
                root / name / f"{i}.png"
            )


def test_folder_sorted_classes_and_crop(tmp_path):
    make_folder(tmp_path)
    data = load_dataset(str(tmp_path), image_size=8)
    assert data.class_names == ["ant", "cat"]
    assert data.images.shape == (4, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert int(data.images[0, 0, 4, 4]) == 200
    assert int(data.images[0, 1, 4, 4]) == 0


def test_folder_grey_images_have_one_channel(tmp_path):
    make_folder(tmp_path, mode="L")
    data = load_dataset(str(tmp_path), image_size=6)
    assert data.images.shape == (4, 1, 6, 6)


def test_folder_with_split_subfolders(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", sizes=((9, 9),))
    assert len(load_dataset(str(tmp_path), "train", image_size=4)) == 4
    assert len(load_dataset(str(tmp_path), "test", image_size=4)) == 2


def test_folder_without_classes_fails(tmp_path):
    with pytest.raises(UserError, match="no class subfolders"):
        load_dataset(str(tmp_path))


def test_folder_empty_class_fails(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "dog").mkdir()
    with pytest.raises(UserError, match="contains no .png"):
        load_dataset(str(tmp_path))


def test_folder_unreadable_image_fails(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        load_dataset(str(tmp_path))


# .npz arrays.


def test_npz_adm_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images, np.array([0, 1, 2, 0, 1, 2]))
    data = load_dataset(str(tmp_path / "s.npz"))
    assert data.images.shape == (6, 3, 5, 5)
    assert torch.equal(data.images[2, 1], torch.from_numpy(images[2, :, :, 1]))
    assert data.class_names == ["0", "1", "2"]


def test_npz_named_arrays_with_class_names(tmp_path):
    images = np.zeros((4, 6, 6), dtype=np.uint8)
    names = np.array(["a", "b", "c"])
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 1, 0]), class_names=names)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.images.shape == (4, 1, 6, 6)
    assert data.class_names == ["a", "b", "c"]


def test_npz_label_out_of_range(tmp_path):
    images = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    names = np.array(["a", "b"])
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 2]), class_names=names)
    with pytest.raises(UserError, match=r"labels must lie in \[0, 2\)"):
        load_dataset(str(tmp_path / "d.npz"))


def test_npz_negative_label(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1]))
    with pytest.raises(UserError, match="labels must lie"):
        load_dataset(str(tmp_path / "d.npz"))


def test_npz_wrong_dtype_and_shape(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 3)), labels=np.array([0, 1]))
    with pytest.raises(UserError, match="must be uint8"):
        load_dataset(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "g.npz", images=np.zeros((2, 4, 4, 5), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(UserError, match="1 or 3 channels"):
        load_dataset(str(tmp_path / "g.npz"))
    np.savez(tmp_path / "h.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(UserError, match="int64 \\[N\\] with N = 3"):
        load_dataset(str(tmp_path / "h.npz"))


def test_npz_pickled_objects_rejected(tmp_path):
    objects = np.array([{"a": 1}, {"b": 2}], dtype=object)
    np.savez(tmp_path / "o.npz", images=objects, labels=np.array([0, 1]))
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(str(tmp_path / "o.npz"))


def test_npz_missing_keys_and_file(tmp_path):
    np.savez(tmp_path / "k.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="arr_0/arr_1 or images/labels"):
        load_dataset(str(tmp_path / "k.npz"))
    with pytest.raises(UserError, match="not found"):
        load_dataset(str(tmp_path / "absent.npz"))


def test_unknown_source_and_split():
    with pytest.raises(UserError, match="unknown data source"):
        load_dataset("no-such-data-set")
    with pytest.raises(UserError, match="invalid split"):
        load_dataset("digits", split="validation")


# Downsampled ImageNet batches.


def imagenet_rows(n, side, offset):
    """Rows whose R, G and B planes hold distinct constants, channel-major as on disk."""
    planes = [np.full((n, side * side), offset + c, dtype=np.uint8) for c in range(3)]
    return np.concatenate(planes, axis=1)


def test_imagenet_batch_directory(tmp_path):
    side = 64
    np.savez(tmp_path / "train_data_batch_1.npz", data=imagenet_rows(3, side, 10), labels=[1, 2, 3])
    np.savez(tmp_path / "train_data_batch_2.npz", data=imagenet_rows(2, side, 50), labels=[1000, 5])
    np.savez(tmp_path / "val_data.npz", data=imagenet_rows(2, side, 90), labels=[7, 8])
    train = load_dataset(str(tmp_path))
    assert train.images.shape == (5, 3, 64, 64)
    assert train.labels.tolist() == [0, 1, 2, 999, 4]
    assert train.images[0, :, 5, 7].tolist() == [10, 11, 12]
    assert train.images[4, :, 0, 0].tolist() == [50, 51, 52]
    assert train.num_classes == 1000
    test = load_dataset(str(tmp_path), "test")
    assert test.labels.tolist() == [6, 7]
    single = load_dataset(str(tmp_path / "val_data.npz"))
    assert single.images.shape == (2, 3, 64, 64)


def test_imagenet_bad_rows(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 30), np.uint8), labels=[1, 2])
    with pytest.raises(UserError, match="not 3 square channels"):
        load_dataset(str(tmp_path))


def test_imagenet_label_zero_rejected(tmp_path):
    np.savez(tmp_path / "val_data.npz", data=imagenet_rows(2, 8, 0), labels=[0, 1])
    with pytest.raises(UserError, match="labels must lie"):
        load_dataset(str(tmp_path), "test")


# Batches.


def collect(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_batches_cover_epoch_and_reshuffle():
    data = toy_data(n=20)
    iterator = BatchIterator(data, batch_size=5, seed=3)
    epoch0 = torch.cat([x[:, 0, 0, 0] for x, _ in collect(iterator, 4)])
    epoch1 = torch.cat([x[:, 0, 0, 0] for x, _ in collect(iterator, 4)])
    expected = to_range(torch.arange(20.0))
    assert torch.equal(epoch0.sort().values, expected)
    assert torch.equal(epoch1.sort().values, expected)
    assert not torch.equal(epoch0, epoch1)
    assert iterator.epoch == 1


def to_range(values):
    return values / 127.5 - 1.0


def test_batches_match_labels_and_range():
    data = toy_data(n=20, classes=4)
    x, y = next(BatchIterator(data, batch_size=20))
    pixel = ((x[:, 0, 0, 0] + 1.0) * 127.5).round().long()
    assert torch.equal(pixel % 4, y)
    assert x.dtype == torch.float32
    assert float(x.min()) >= -1.0


def test_batches_shard_ranks_disjointly():
    data = toy_data(n=21)
    seen = []
    for rank in range(2):
        iterator = BatchIterator(data, batch_size=5, seed=1, rank=rank, world_size=2)
        assert iterator.batches_per_epoch == 2
        seen.append(torch.cat([x[:, 0, 0, 0] for x, _ in collect(iterator, 2)]))
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 20


def test_batches_resume_exactly():
    data = toy_data(n=20)
    straight = BatchIterator(data, batch_size=3, seed=5, hflip=True)
    expected = collect(straight, 15)
    first = BatchIterator(data, batch_size=3, seed=5, hflip=True)
    collect(first, 7)
    resumed = BatchIterator(data, batch_size=3, seed=5, hflip=True)
    resumed.load_state_dict(first.state_dict())
    for (x, y), (x_ref, y_ref) in zip(collect(resumed, 8), expected[7:], strict=True):
        assert torch.equal(x, x_ref)
        assert torch.equal(y, y_ref)


def test_batches_resume_needs_same_seed():
    data = toy_data()
    other = BatchIterator(data, batch_size=4, seed=1)
    with pytest.raises(UserError, match="same --seed"):
        other.load_state_dict(BatchIterator(data, batch_size=4, seed=2).state_dict())


def test_hflip_flips_about_half():
    images = torch.zeros(400, 1, 2, 2, dtype=torch.uint8)
    images[:, :, :, 0] = 255
    data = ImageData(images, torch.zeros(400, dtype=torch.int64), ["a"], "edge")
    x, _ = next(BatchIterator(data, batch_size=400, hflip=True))
    flipped = (x[:, 0, 0, 1] > 0).float().mean().item()
    assert 0.4 < flipped < 0.6
    x, _ = next(BatchIterator(data, batch_size=400, hflip=False))
    assert float((x[:, 0, 0, 1] > 0).float().mean()) == 0.0


def test_batch_larger_than_shard_fails():
    with pytest.raises(UserError, match="lower --batch-size"):
        BatchIterator(toy_data(n=10), batch_size=6, world_size=2)
