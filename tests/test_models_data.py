"""Models (parameter counts, shapes), datasets (CIFAR-10 on-disk format, Debian's Fashion-MNIST,
synthetic), ``--dataset auto`` and the learning-rate schedule. No processes are started here.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    DEBIAN_FASHION_MNIST,
    _read_idx,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    make_synthetic,
    resolve_dataset,
)
from trainer.loop import lr_factor
from trainer.models import build_model, count_parameters

# --- models -------------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "params"),
    [("simplecnn", 1_143_466), ("resnet18", 11_173_962), ("resnet50", 23_520_842)],
)
def test_parameter_counts(name: str, params: int) -> None:
    assert count_parameters(build_model(name)) == params


def test_cifar_stem_and_output_shape() -> None:
    model = build_model("resnet18")
    assert (
        model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    )
    assert isinstance(model.maxpool, torch.nn.Identity)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert build_model("simplecnn").eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.fast
def test_unknown_model_is_named() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


# --- CIFAR-10 in its real on-disk format ----------------------------------------------------


def _dump_py2(obj: dict, path: Path, strings: list[str]) -> None:
    """Pickle ``obj`` as Python 2 did for the published files: its keys and ``strings`` as py2 ``str``.

    The published batches are Python 2 cPickle files; their keys are py2 byte
    strings (opcode SHORT_BINSTRING), read back as ``b"data"`` with
    ``encoding="bytes"`` (the snippet on the CIFAR page) and as ``"data"`` with
    ``encoding="latin1"`` (torchvision). Python 3 writes ``str`` as unicode
    (BINUNICODE), so the protocol-2 stream is patched, opcode for opcode.
    """
    blob = pickle.dumps(obj, protocol=2)
    for text in strings:
        raw = text.encode()
        blob = blob.replace(b"X" + len(raw).to_bytes(4, "little") + raw, b"U" + bytes([len(raw)]) + raw)
    path.write_bytes(blob)


def _write_cifar(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, np.ndarray]:
    """A tiny CIFAR-10 in the published layout: py2 pickles of dicts, b'data' uint8 N×3072 (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        entry = {"batch_label": f"{name} of 6", "labels": labels, "data": data}
        _dump_py2(entry, folder / name, ["batch_label", "labels", "data"])
        written[name] = data
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": label_names, "num_vis": 3072, "num_cases_per_batch": per_batch}
    _dump_py2(meta, folder / "batches.meta", [*meta, *label_names])
    return written


@pytest.mark.fast
def test_cifar10_loads_the_on_disk_format(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:  # read as on the CIFAR page
        assert set(pickle.load(f, encoding="bytes")) == {b"batch_label", b"labels", b"data"}
    train_x, train_y, test_x, test_y, classes = load_cifar10(tmp_path, verify_md5=False)
    assert train_x.shape == (15, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (4, 3, 32, 32)
    assert train_y.tolist()[:3] == [0, 1, 2] and len(test_y) == 4
    assert classes[0] == "airplane" and len(classes) == 10
    # each row is 1024 red, 1024 green, 1024 blue bytes, row-major: channel c, pixel (h, w)
    row = written["data_batch_1"][1]
    assert train_x[1, 2, 5, 7] == row[2 * 1024 + 5 * 32 + 7]
    assert torch.equal(test_x[3].reshape(-1), torch.from_numpy(written["test_batch"][3]))


@pytest.mark.fast
def test_cifar10_verifies_md5_by_default(tmp_path: Path) -> None:
    # torchvision checks the published MD5 of every file; ours are not those files.
    _write_cifar(tmp_path)
    with pytest.raises(RuntimeError, match="could not be loaded.*corrupted"):
        load_cifar10(tmp_path)


@pytest.mark.fast
def test_auto_prefers_cifar10_and_says_why(tmp_path: Path) -> None:
    _write_cifar(tmp_path, per_batch=40, n_test=10)
    name, root, reason = resolve_dataset("auto", tmp_path)
    assert (name, root) == ("cifar10", tmp_path)
    assert "cifar-10-batches-py" in reason
    data = load_dataset(name, root, reason=reason, verify_md5=False)
    torch.manual_seed(0)
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert len(data.train) == 200 and len(data.test) == 10


@pytest.mark.fast
def test_auto_without_cifar_falls_back(tmp_path: Path) -> None:
    name, _, reason = resolve_dataset("auto", tmp_path)
    expected = (
        "fashion-mnist" if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() else "synthetic"
    )
    assert name == expected
    assert reason.startswith("auto: no cifar-10-batches-py")


@pytest.mark.fast
def test_explicit_cifar10_missing_says_what_to_do(tmp_path: Path) -> None:
    name, root, _ = resolve_dataset("cifar10", tmp_path)
    with pytest.raises(RuntimeError, match="fashion-mnist or synthetic"):
        load_dataset(name, root)


# --- Fashion-MNIST ------------------------------------------------------------------------------


@pytest.mark.fast
def test_idx_reader_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes() + array.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(_read_idx(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + raw[4:])
    with pytest.raises(ValueError, match="not an idx file"):
        _read_idx(tmp_path / "bad")


@pytest.mark.fast
@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST} missing)",
)
def test_fashion_mnist_from_debian_files() -> None:
    train_x, train_y, test_x, test_y, classes = load_fashion_mnist(DEBIAN_FASHION_MNIST)
    assert train_x.shape == (60_000, 1, 32, 32) and test_x.shape == (10_000, 1, 32, 32)
    assert train_x.dtype == torch.uint8
    assert int(train_x[:, :, :2].max()) == 0 and int(train_x[:, :, :, -2:].max()) == 0  # zero padding
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert torch.bincount(test_y).tolist() == [1000] * 10
    assert classes[9] == "Ankle boot"
    data = load_dataset("fashion-mnist", DEBIAN_FASHION_MNIST)
    image, _ = data.test[0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[2])  # grey repeated over three channels
    # normalisation constants fit the padded images: the first 1000 test images are near mean 0, std 1
    batch = torch.stack([data.test[i][0] for i in range(1000)])
    assert abs(float(batch.mean())) < 0.1 and abs(float(batch.std()) - 1) < 0.1


# --- synthetic --------------------------------------------------------------------------------------


@pytest.mark.fast
def test_synthetic_is_deterministic_and_balanced() -> None:
    a = make_synthetic(500, 100)
    b = make_synthetic(500, 100)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert a[0].shape == (500, 3, 32, 32) and a[0].dtype == torch.uint8
    assert torch.bincount(a[1], minlength=10).min() > 20
    assert not torch.equal(make_synthetic(500, 100, seed=1)[0], a[0])


@pytest.mark.fast
def test_synthetic_classes_are_separable_by_their_templates() -> None:
    # learnable: the nearest class mean (from the training split) classifies most test images
    train_x, train_y, test_x, test_y, _ = make_synthetic(2000, 500)
    means = torch.stack([train_x[train_y == c].float().mean(0) for c in range(10)])
    dist = torch.cdist(test_x.float().flatten(1), means.flatten(1))
    assert (dist.argmin(1) == test_y).float().mean() > 0.9


@pytest.mark.fast
def test_train_augmentation_keeps_shape() -> None:
    data = load_dataset("synthetic", None, synthetic_size=(100, 20))
    torch.manual_seed(0)
    views = torch.stack([data.train[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32)
    assert not all(torch.equal(views[0], v) for v in views[1:])  # random crops and flips differ
    assert torch.equal(data.test[0][0], data.test[0][0])  # the test transform is deterministic


@pytest.mark.fast
@pytest.mark.parametrize("channels", [3, 1])
def test_the_transforms_give_torchvision_v2s_very_bits(channels: int) -> None:
    """trainer.data's plain-torch transforms against the torchvision.transforms.v2 they stand for:
    from the same RNG state, the same random crops and flips, and bitwise the same floats."""
    from torchvision.transforms import v2

    from trainer.data import CIFAR10_FOLDER, test_transform, train_transform
    from trainer.data import _cifar10 as cifar10_class

    assert cifar10_class().base_folder == CIFAR10_FOLDER
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    theirs_train = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    theirs_test = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ours_train, ours_test = train_transform(mean, std), test_transform(mean, std)
    images = torch.randint(
        0, 256, (1000, channels, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    images = images.expand(-1, 3, -1, -1)  # as ImageTensorDataset gives a 1-channel image: a view
    torch.manual_seed(11)
    ours = torch.stack([ours_train(im) for im in images])
    after_ours = torch.rand(1)
    torch.manual_seed(11)
    theirs = torch.stack([theirs_train(im) for im in images])
    assert torch.equal(torch.rand(1), after_ours), "the transforms drew a different number of random numbers"
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[0], ours_test(images[0])) or not torch.equal(ours[1], ours_test(images[1]))
    assert torch.equal(
        torch.stack([ours_test(im) for im in images[:50]]),
        torch.stack([theirs_test(im) for im in images[:50]]),
    )


# --- learning-rate schedule ---------------------------------------------------------------


@pytest.mark.fast
def test_lr_factor_warmup_then_cosine_to_zero() -> None:
    f = [lr_factor(s, total_steps=100, warmup_steps=10, schedule="cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0) and f[-1] < 0.01


@pytest.mark.fast
def test_lr_factor_multistep_and_scaled_warmup() -> None:
    f = [lr_factor(s, total_steps=100, warmup_steps=0, schedule="multistep") for s in range(100)]
    assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[75] == pytest.approx(0.01)
    # with --scale-lr the warmup starts from the single-worker rate, 1/world_size of the peak
    assert lr_factor(
        0, total_steps=10, warmup_steps=4, schedule="constant", start_factor=0.25
    ) == pytest.approx(0.25 + 0.75 / 4)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, total_steps=10, warmup_steps=0, schedule="step")
