"""Datasets as in-memory uint8 tensors, the training augmentation, and ``--dataset auto``.

Every dataset ends up the same way: ``images`` uint8 of shape N×C×32×32 (C is 3,
or 1 for Fashion-MNIST, expanded to 3 channels on the fly as a view) and
``labels`` int64 of shape N. Keeping the raw bytes and augmenting each item
on access costs ~0.2 ms per image on one core, negligible beside the model.

=================  ===================================================  =============
``--dataset``      where it comes from                                  train / test
=================  ===================================================  =============
``cifar10``        ``torchvision.datasets.CIFAR10(root=data_dir)``:     50,000/10,000
                   ``cifar-10-batches-py`` under ``--data-dir``
                   (downloaded there only when asked and online)
``fashion-mnist``  the idx files under ``--data-dir``, else those of    60,000/10,000
                   Debian's ``dataset-fashion-mnist`` package
                   (``/usr/share/datasets/fashion-mnist``); 1×28×28
                   zero-padded to 1×32×32 and repeated to 3 channels
``synthetic``      generated here: 10 classes in 5 pairs; a pair        10,000/2,000
                   shares a colour and a coarse pattern, its two
                   classes differ by a faint finer one; mixed with
                   another class, contrast, brightness and noise;
                   deterministic (seed 0), learnable, not trivial
``auto``           the first available of cifar10, fashion-mnist,
                   synthetic (never downloads); ``resolve_dataset``
                   says which and why
=================  ===================================================  =============

Training augmentation is the usual CIFAR one: ``RandomCrop(32, padding=4)``
then ``RandomHorizontalFlip()``, then scaling to [0, 1] and per-dataset
normalisation. Test images are only scaled and normalised.

The random draws of the augmentation come from torch's global RNG of the
process that calls ``__getitem__`` (the training process, with
``num_workers=0``), which is why the checkpoint saves each rank's RNG state.

**No torchvision at import.** The transforms are written here in plain torch,
drawing their random numbers as ``torchvision.transforms.v2``'s do (the same
calls of the global RNG, in the same order), so they give the very bits v2 gave
(``tests/test_models_data.py`` compares them on a thousand images). torchvision
is imported only to read CIFAR-10: its package root imports every model and op,
about 2 s of CPU on a 2-core machine, which each rank of a synthetic or
Fashion-MNIST run, and each run of the test suite's ~85 processes, would pay
for nothing.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .names import DATASET_NAMES

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DataSourceError",
    "ImageData",
    "ImageTensorDataset",
    "check_source",
    "download_cifar10",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "resolve_dataset",
]

DATASETS = DATASET_NAMES  # one list, which launch.py reads without torch (names.py)

#: where Debian's ``dataset-fashion-mnist`` package puts the four idx files
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Per-dataset normalisation, per channel: mean and std of the training images in [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# Fashion-MNIST's are 0.2860 / 0.3530 on 28×28; these are of the zero-padded 32×32 images.
FASHION_MEAN, FASHION_STD = (0.2190,) * 3, (0.3318,) * 3

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class ImageTensorDataset(Dataset):
    """Items ``(transform(image), label)`` from uint8 images N×C×32×32 (C = 1 or 3).

    Args:
        images: uint8 tensor N×C×H×W; a single channel is expanded to three (a view).
        labels: int64 tensor of N class indices.
        transform: applied to each 3×H×W uint8 image; returns a float tensor.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 N×C×H×W with C in (1, 3), got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return self.transform(image), int(self.labels[index])


@dataclass
class ImageData:
    """A resolved dataset: both splits, class names, and why it was chosen."""

    name: str
    train: ImageTensorDataset
    test: ImageTensorDataset
    classes: list[str]
    reason: str


class Compose:
    """Apply ``steps`` in order (as ``v2.Compose``)."""

    def __init__(self, steps: list[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.steps = steps

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop ``size``×``size`` at a random place.

    As ``v2.RandomCrop(size, padding=padding)``: the top row is drawn first, then the left
    column, each uniform over the places that fit (``torch.randint(0, room + 1, size=())``).
    """

    def __init__(self, size: int, padding: int) -> None:
        self.size, self.padding = size, padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        p = self.padding
        padded = torch.nn.functional.pad(image, (p, p, p, p)) if p else image
        height, width = padded.shape[-2:]
        top = int(torch.randint(0, height - self.size + 1, size=())) if height > self.size else 0
        left = int(torch.randint(0, width - self.size + 1, size=())) if width > self.size else 0
        return padded[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    """Mirror left to right with probability ``p`` (as v2: one ``torch.rand(1)``, kept if it is >= p)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(1) >= self.p:
            return image
        return image.flip(-1)


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 to float32 0..1 (as ``v2.ToDtype(torch.float32, scale=True)``: times 1/255)."""
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    return image.to(torch.float32).mul_(1.0 / 255)


class Normalize:
    """Per channel, subtract ``mean`` and divide by ``std`` (as ``v2.Normalize``)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.sub(self.mean).div_(self.std)


def train_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Compose:
    """RandomCrop(32, padding=4), RandomHorizontalFlip, scale to [0, 1], normalise."""
    return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), to_unit_float, Normalize(mean, std)])


def test_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Compose:
    """Scale to [0, 1] and normalise; no augmentation."""
    return Compose([to_unit_float, Normalize(mean, std)])


# --- CIFAR-10 ---------------------------------------------------------------------------


#: The folder torchvision's CIFAR10 reads under its root (its ``CIFAR10.base_folder``; a test checks).
CIFAR10_FOLDER = "cifar-10-batches-py"


def _cifar10(verify_md5: bool = True) -> Any:
    """torchvision's CIFAR10 dataset class, imported only now (see the module's docstring).

    With ``verify_md5=False``, a subclass that checks the files exist but not their
    MD5 sums. torchvision's ``_check_integrity`` calls ``check_integrity(path, md5)``
    for each file listed in ``train_list``/``test_list``/``meta``, and that function
    documents ``md5=None`` as "existence only". Listing the same files with no
    checksum therefore keeps torchvision's loader, pickle parsing included, and
    lets it read files that are in the right format but are not the published
    ones (a tiny test copy, or a re-pickled one). Real data should be verified.
    """
    from torchvision.datasets import CIFAR10

    if verify_md5:
        return CIFAR10

    class CIFAR10Unverified(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Unverified


def cifar10_present(root: str | Path) -> bool:
    """Whether ``root/cifar-10-batches-py`` exists (contents are checked when loading)."""
    return (Path(root) / CIFAR10_FOLDER).is_dir()


def load_cifar10(
    root: str | Path, *, download: bool = False, verify_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` through torchvision.

    Returns:
        train images (uint8 N×3×32×32), train labels, test images, test labels, class names.

    Raises:
        RuntimeError: the files are missing or fail their MD5 check (torchvision's
            message), with what to do.
    """
    cls = _cifar10(verify_md5)
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=False)
    except RuntimeError as exc:
        # torchvision's "You can use download=True to download it" speaks to a Python caller
        why = str(exc).split(" You can use download=True")[0].rstrip(". ")
        raise RuntimeError(
            f"CIFAR-10 could not be loaded from {Path(root) / CIFAR10_FOLDER}: {why}. "
            "Put the extracted cifar-10-python.tar.gz there (or pass --download when online), "
            "or use --dataset fashion-mnist or synthetic"
        ) from exc

    def to_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.int64)

    return (*to_tensors(train), *to_tensors(test), list(train.classes))


# --- Fashion-MNIST ----------------------------------------------------------------------

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic 0x0000 0x08 ndim, big-endian uint32 dims, uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {data.size} bytes of data")
    return data.reshape(dims)


def _find_fashion_files(root: Path) -> dict[str, Path] | None:
    """The four idx files (plain or .gz) in ``root`` or ``root/FashionMNIST/raw``, else None."""
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        found: dict[str, Path] = {}
        for key, stem in _FASHION_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_FASHION_FILES):
            return found
    return None


def fashion_mnist_dir(data_dir: str | Path | None) -> Path | None:
    """The folder to load Fashion-MNIST from: ``data_dir`` if it has the files, else Debian's, else None."""
    for root in ([Path(data_dir)] if data_dir else []) + [DEBIAN_FASHION_MNIST]:
        if _find_fashion_files(root) is not None:
            return root
    return None


def load_fashion_mnist(
    root: str | Path,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Fashion-MNIST from the idx files in ``root``, as uint8 N×1×32×32 (zero-padded by 2).

    Returns:
        train images, train labels, test images, test labels, class names.
    """
    files = _find_fashion_files(Path(root))
    if files is None:
        raise FileNotFoundError(
            f"no Fashion-MNIST idx files ({', '.join(_FASHION_FILES.values())}, optionally .gz) "
            f"under {root}; install Debian's dataset-fashion-mnist or pass --data-dir"
        )

    def images(key: str) -> torch.Tensor:
        x = torch.from_numpy(_read_idx(files[key]).copy())  # N×28×28
        return torch.nn.functional.pad(x, (2, 2, 2, 2)).unsqueeze(1).contiguous()  # N×1×32×32

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(files[key]).astype(np.int64))

    return (
        images("train_images"),
        labels("train_labels"),
        images("test_images"),
        labels("test_labels"),
        list(FASHION_CLASSES),
    )


# --- synthetic --------------------------------------------------------------------------


#: The synthetic classes come in pairs (0 and 1, 2 and 3, ...): the two classes of a pair share a
#: colour and a coarse pattern and differ only by a finer "detail" pattern, added to one and
#: subtracted from the other with this amplitude (grey levels of 255), pair by pair. The pairs differ
#: in difficulty (the amplitude falls from first to last; the random pattern's own strength adds to
#: it), so their accuracies differ and the confusion matrix shows them.
SYNTHETIC_PAIR_DETAIL = (60, 46, 35, 27, 20)


def make_synthetic(
    n_train: int = 10_000, n_test: int = 2_000, *, seed: int = 0, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """A deterministic CIFAR-shaped dataset that is learnable but not trivially so.

    Templates: the classes come in pairs (``c`` and ``c ^ 1``). A pair shares a
    random colour and a coarse pattern (4×4 random values upsampled to 32×32,
    amplitude 60); its two classes differ by a finer pattern (8×8 upsampled),
    added to the first and subtracted from the second with the amplitude of
    ``SYNTHETIC_PAIR_DETAIL``, which falls from pair to pair. Telling the pairs
    apart is easy; telling the two classes of a pair apart takes longer, the
    more so the later the pair.

    Each image is its class's template mixed with a random other class's
    (weight uniform in [0, 0.4]), then given a random contrast (×0.7 to ×1.3
    about mid-grey) and brightness (Gaussian, sigma 20), then Gaussian noise
    (sigma 50). Crops of 4 pixels and flips keep most of a pattern.

    What it gives, measured on a 2-core CPU: the default ``launch.py --algo
    ring --world-size 4`` run (one epoch capped at 150 steps, which is 78
    steps of 128 images here) ends at 76.05 % test accuracy (81.05 % and
    72.60 % with ``--seed`` 1 and 2, which change the model's initialisation
    and the order of the batches, not this data); per class from 19.5 % to
    100 %: classes 0 and 1 all right, the second class of each later pair
    often taken for its partner (classes 3, 5, 7, 9: 76, 49, 20, 47 %), and
    98 % of the errors within a pair. Three epochs (``--epochs 3 --max-steps 0``)
    reach 64.65 %, 79.05 %, then 81.75 %. The nearest class mean on raw
    pixels gets 92.7 % (the earlier data, without pairs or mixing: 100 %).
    The same ``seed`` gives the same bytes on every rank and every run.
    """
    g = torch.Generator().manual_seed(seed)
    pairs = (num_classes + 1) // 2

    def upsampled(cells: int) -> torch.Tensor:
        coarse = torch.rand(pairs, 1, cells, cells, generator=g) * 2 - 1
        return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)

    colours = torch.rand(pairs, 3, 1, 1, generator=g) * 160 + 48
    shared, detail = upsampled(4), upsampled(8)  # pairs×1×32×32, broadcast over channels
    amplitude = torch.tensor([SYNTHETIC_PAIR_DETAIL[p % len(SYNTHETIC_PAIR_DETAIL)] for p in range(pairs)])
    pair = torch.arange(num_classes) // 2
    sign = 1 - 2 * (torch.arange(num_classes) % 2)  # +1 for the first class of a pair, -1 for the second
    templates = colours[pair] + 60 * shared[pair] + (sign * amplitude[pair]).view(-1, 1, 1, 1) * detail[pair]

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        others = torch.randint(0, num_classes, (n,), generator=g)
        mix = torch.rand(n, 1, 1, 1, generator=g) * 0.4
        contrast = 0.7 + torch.rand(n, 1, 1, 1, generator=g) * 0.6
        brightness = torch.randn(n, 1, 1, 1, generator=g) * 20
        images = (1 - mix) * templates[labels] + mix * templates[others]
        images = (images - 128) * contrast + 128 + brightness + torch.randn(n, 3, 32, 32, generator=g) * 50
        return images.clamp_(0, 255).round_().to(torch.uint8), labels

    train_images, train_labels = split(n_train)
    test_images, test_labels = split(n_test)
    classes = [f"class{c}" for c in range(num_classes)]
    return train_images, train_labels, test_images, test_labels, classes


# --- choosing and loading ---------------------------------------------------------------


class DataSourceError(ValueError):
    """``--dataset`` / ``--data-dir`` / ``--download`` cannot be served; the message starts with the flag."""


def _fashion_files_listed() -> str:
    return ", ".join(f"{stem}[.gz]" for stem in _FASHION_FILES.values())


def check_source(name: str, data_dir: str | Path | None, download: bool = False) -> None:
    """Refuse a dataset request that cannot be served as asked, before any work starts.

    An explicit ``--data-dir`` must hold what is asked for: ``--dataset auto``
    then means "CIFAR-10 or Fashion-MNIST from this folder", never a fallback to
    Debian's files or to synthetic data that the user did not ask for. An
    explicit ``--dataset`` must be there (CIFAR-10 unless ``--download``).
    Files are only looked for here; ``load_dataset`` reads and checks them.

    Raises:
        DataSourceError: what is missing and what to do, in command-line terms.
    """
    if name not in DATASETS:
        raise DataSourceError(f"--dataset {name}: unknown; expected one of {', '.join(DATASETS)}")
    if download and name != "cifar10":
        raise DataSourceError(f"--download: only --dataset cifar10 downloads (this is --dataset {name})")
    folder = Path(data_dir) if data_dir else None
    if folder is not None and name == "synthetic":
        raise DataSourceError(
            f"--data-dir {data_dir}: --dataset synthetic is generated and reads no files; leave --data-dir out"
        )
    if folder is not None and not folder.is_dir() and not download:
        raise DataSourceError(f"--data-dir {data_dir}: no such folder")
    if name == "cifar10" and not download and not cifar10_present(folder or "data"):
        where = f"--data-dir {data_dir}" if folder else "data (the default --data-dir)"
        raise DataSourceError(
            f"--dataset cifar10: no {CIFAR10_FOLDER} folder in {where}; put the extracted "
            "cifar-10-python.tar.gz there, or add --download (needs network)"
        )
    if name == "fashion-mnist":
        if folder is not None and _find_fashion_files(folder) is None:
            raise DataSourceError(
                f"--data-dir {data_dir}: no Fashion-MNIST idx files ({_fashion_files_listed()}) "
                "in it or in its FashionMNIST/raw"
            )
        if folder is None and fashion_mnist_dir(None) is None:
            raise DataSourceError(
                f"--dataset fashion-mnist: no idx files in {DEBIAN_FASHION_MNIST}; install Debian's "
                "dataset-fashion-mnist or pass --data-dir with the four files"
            )
    if name == "auto" and folder is not None:
        if not cifar10_present(folder) and _find_fashion_files(folder) is None:
            raise DataSourceError(
                f"--data-dir {data_dir}: neither {CIFAR10_FOLDER} nor the Fashion-MNIST idx files "
                "are in it (--dataset auto reads one of them from --data-dir; leave --data-dir out "
                "to fall back to Debian's Fashion-MNIST or synthetic data)"
            )


def download_cifar10(root: str | Path) -> None:
    """Download and extract CIFAR-10 into ``root`` (torchvision skips it if the files are there and intact).

    A failed download takes back what it made: the folder, if it was not there before, and any
    file it left in a folder that was (a partial archive), so a retry or a copy by hand starts clean.

    Raises:
        DataSourceError: the download failed (offline, say), with what to do instead.
    """
    folder = Path(root)
    existed = folder.exists()
    before = set(folder.iterdir()) if folder.is_dir() else set()
    try:
        _cifar10()(root=str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad archive a RuntimeError
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for made in set(folder.iterdir()) - before:
                if made.is_dir():
                    shutil.rmtree(made, ignore_errors=True)
                else:
                    made.unlink(missing_ok=True)
        why = getattr(exc, "reason", None) or exc
        raise DataSourceError(
            f"--download: could not download CIFAR-10 into {root} ({why}); without network, put the "
            "extracted cifar-10-python.tar.gz there yourself, or use --dataset fashion-mnist or synthetic"
        ) from exc


def resolve_dataset(name: str, data_dir: str | Path | None) -> tuple[str, Path | None, str]:
    """Decide which dataset ``--dataset name`` means here, and where it lives.

    Returns:
        (dataset name, folder to load from or None, a sentence saying why).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    cifar_roots = [Path(data_dir)] if data_dir else [Path("data")]
    if name == "cifar10":
        return "cifar10", cifar_roots[0], "asked for"
    if name == "fashion-mnist":
        root = fashion_mnist_dir(data_dir)
        if root is None:
            raise FileNotFoundError(
                f"--dataset fashion-mnist: no idx files under {data_dir or '(no --data-dir)'} nor "
                f"{DEBIAN_FASHION_MNIST}; install dataset-fashion-mnist or pass --data-dir"
            )
        return "fashion-mnist", root, "asked for"
    if name == "synthetic":
        return "synthetic", None, "asked for"
    # auto: the first available, never downloading
    for root in cifar_roots:
        if cifar10_present(root):
            return "cifar10", root, f"auto: found {root / CIFAR10_FOLDER}"
    why = f"no {CIFAR10_FOLDER} under {cifar_roots[0]}"
    root = fashion_mnist_dir(data_dir)
    if root is not None:
        return "fashion-mnist", root, f"auto: {why}; found Fashion-MNIST in {root}"
    return (
        "synthetic",
        None,
        f"auto: {why} and no Fashion-MNIST (Debian's {DEBIAN_FASHION_MNIST} or --data-dir)",
    )


def load_dataset(
    name: str,
    root: Path | None,
    *,
    reason: str = "",
    download: bool = False,
    verify_md5: bool = True,
    synthetic_size: tuple[int, int] = (10_000, 2_000),
) -> ImageData:
    """Load a resolved dataset (see ``resolve_dataset``) with its transforms.

    Args:
        name: ``cifar10``, ``fashion-mnist`` or ``synthetic``.
        root: the folder to load from (ignored for synthetic).
        reason: carried into ``ImageData.reason`` for the first output line.
        download: CIFAR-10 only: let torchvision download into ``root`` if missing.
        verify_md5: CIFAR-10 only: check the published MD5 sums (see ``_cifar10``).
        synthetic_size: (train, test) sizes of the synthetic dataset.
    """
    if name == "cifar10":
        assert root is not None
        tr_x, tr_y, te_x, te_y, classes = load_cifar10(root, download=download, verify_md5=verify_md5)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif name == "fashion-mnist":
        assert root is not None
        tr_x, tr_y, te_x, te_y, classes = load_fashion_mnist(root)
        mean, std = FASHION_MEAN, FASHION_STD
    elif name == "synthetic":
        tr_x, tr_y, te_x, te_y, classes = make_synthetic(*synthetic_size)
        # statistics of the generated bytes: cheap to compute exactly
        sample = tr_x[:2000].float() / 255
        mean = tuple(sample.mean(dim=(0, 2, 3)).tolist())
        std = tuple(sample.std(dim=(0, 2, 3)).tolist())
    else:
        raise ValueError(f"load_dataset: unknown dataset {name!r} (resolve 'auto' first)")
    return ImageData(
        name=name,
        train=ImageTensorDataset(tr_x, tr_y, train_transform(mean, std)),
        test=ImageTensorDataset(te_x, te_y, test_transform(mean, std)),
        classes=classes,
        reason=reason or "asked for",
    )
