"""Fashion-MNIST on disk: find it, verify it, prepare torchvision's folder, load it as tensors.

Where the data comes from, first match wins:

1. ``--data-dir`` (the trainer's default is ``data``),
2. the folder named by ``$FASHION_MNIST_DIR``,
3. the files of Debian's package ``dataset-fashion-mnist`` (found with ``dpkg -L``),
4. torchvision's download into ``--data-dir``.

A folder may hold the four IDX files gzipped (``train-images-idx3-ubyte.gz``, ...) or decompressed,
either directly or in torchvision's layout ``<dir>/FashionMNIST/raw/``.

Verification. torchvision's md5 sums are those of the upstream ``.gz`` files. Debian's package
holds the same deflate streams under other gzip headers (file name and time stripped; restoring them
reproduces torchvision's md5 for all four files), so its .gz sums differ while the decompressed
bytes are identical; the tests' synthetic sets have no known sum at all. Hence two layers:

* every file is checked by structure, which catches truncation and corruption wherever the data
  came from: the gzip stream must decompress completely (gzip's CRC-32 and length trailer), the
  IDX header must carry the right magic number and 28x28 images, the byte count must equal what
  the header announces, labels must lie in 0..9, and each split's image and label counts agree;
* a file whose header announces the real set's size (60000 or 10000 items) must in addition have
  the md5 sum of the real set's *decompressed* content, whichever way it was compressed.

Any failure raises :class:`DataError` naming the file; a run never starts on bad data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
FILE_NAMES = (IMAGES["train"], LABELS["train"], IMAGES["test"], LABELS["test"])
# The real set's decompressed files: (number of items, md5 of the content). These are the contents
# of the upstream .gz files whose md5 sums torchvision lists (FashionMNIST.resources).
KNOWN_CONTENT = {
    "train-images-idx3-ubyte": (60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60000, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (10000, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10000, "15d484375f8d13e6eb1aabb0c3f46965"),
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
ROWS = COLS = 28
NUM_CLASSES = len(CLASS_NAMES)

PathLike = Union[str, os.PathLike]


class DataError(RuntimeError):
    """Fashion-MNIST is missing, incomplete, truncated or corrupt."""


def how_to_provide(data_dir: PathLike) -> str:
    """The three ways to give the trainer the data, as a message for the user."""
    gz = ", ".join(n + ".gz" for n in FILE_NAMES)
    return (
        "Provide Fashion-MNIST in one of three ways:\n"
        f"  1. --data-dir DIR: a folder with the four files ({gz}), gzipped or not, directly or in "
        f"torchvision's layout DIR/FashionMNIST/raw/ (now: {data_dir});\n"
        f"  2. {ENV_VAR}=DIR: the same kind of folder, named by the environment;\n"
        f"  3. sudo apt-get install {DEBIAN_PACKAGE} (Debian/Ubuntu; `make train` does this where "
        "it may): found through dpkg.\n"
        "Otherwise torchvision downloads it into --data-dir, which needs internet access."
    )


# ---------------------------------------------------------------------------------------------
# Finding


@dataclass(frozen=True)
class Found:
    """Where the four files were found: ``files`` maps each IDX name to a .gz or plain file."""

    origin: str
    files: dict


def _in_folder(folder: Path) -> Optional[dict]:
    """The four files in ``folder`` (plain preferred over .gz), None when absent.

    Raises DataError when the folder holds some of them but not all (an interrupted copy or
    download should be named, not skipped in favour of another source).
    """
    files, missing = {}, []
    for name in FILE_NAMES:
        plain, gz = folder / name, folder / (name + ".gz")
        if plain.is_file():
            files[name] = plain
        elif gz.is_file():
            files[name] = gz
        else:
            missing.append(name)
    if not files:
        return None
    if missing:
        raise DataError(
            f"{folder} holds only part of Fashion-MNIST; missing: "
            + ", ".join(m + "[.gz]" for m in missing)
            + " (complete the folder, or delete it to look elsewhere)"
        )
    return files


def _in_tree(root: Path) -> Optional[dict]:
    """The four files in torchvision's layout under ``root`` or directly in it."""
    for folder in (root / "FashionMNIST" / "raw", root):
        files = _in_folder(folder)
        if files is not None:
            return files
    return None


def debian_files() -> Optional[dict]:
    """The .gz files of Debian's ``dataset-fashion-mnist`` as dpkg lists them, else None."""
    if shutil.which("dpkg") is None:
        return None
    try:
        listing = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if listing.returncode != 0:
        return None
    by_name = {Path(line).name: Path(line) for line in listing.stdout.splitlines()}
    files = {n: by_name.get(n + ".gz") for n in FILE_NAMES}
    if not all(p is not None and p.is_file() for p in files.values()):
        return None
    return files


def find(data_dir: PathLike, use_env: bool = True, use_debian: bool = True) -> Optional[Found]:
    """Look for the four files in ``data_dir``, then ``$FASHION_MNIST_DIR``, then Debian's package.

    Returns None when none of them has the data; raises DataError for a half-present set.
    """
    candidates = [("--data-dir " + str(data_dir), Path(data_dir))]
    env = os.environ.get(ENV_VAR) if use_env else None
    if env:
        if not Path(env).is_dir():
            raise DataError(f"${ENV_VAR}={env} is not a folder")
        candidates.append((f"${ENV_VAR}={env}", Path(env)))
    for origin, root in candidates:
        files = _in_tree(root) if root.is_dir() else None
        if files is not None:
            return Found(origin, files)
    if use_debian:
        files = debian_files()
        if files is not None:
            return Found(f"Debian package {DEBIAN_PACKAGE}", files)
    return None


# ---------------------------------------------------------------------------------------------
# Verifying


def read_bytes(path: Path) -> bytes:
    """The decompressed content of an IDX file (gzipped or plain); DataError when unreadable."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(
            f"{path}: corrupt or truncated gzip file ({err}); delete it and fetch it again"
        ) from err


def check_idx(path: Path, content: bytes) -> int:
    """Check an IDX image or label file; return its number of items.

    Images: magic 2051, N x 28 x 28 unsigned bytes. Labels: magic 2049, N bytes in 0..9. A file
    with the real set's name and item count must also have the real set's md5 sum.
    """
    images = "images" in path.name
    header = 16 if images else 8
    if len(content) < header:
        raise DataError(f"{path}: {len(content)} bytes, too short for an IDX header (truncated)")
    magic, count = struct.unpack(">ii", content[:8])
    if magic != (IMAGE_MAGIC if images else LABEL_MAGIC):
        raise DataError(
            f"{path}: magic number {magic}, expected "
            f"{IMAGE_MAGIC if images else LABEL_MAGIC}; not an IDX "
            f"{'image' if images else 'label'} file"
        )
    item = ROWS * COLS if images else 1
    if images:
        rows, cols = struct.unpack(">ii", content[8:16])
        if (rows, cols) != (ROWS, COLS):
            raise DataError(f"{path}: images of {rows}x{cols}, expected {ROWS}x{COLS}")
    if count <= 0 or len(content) != header + count * item:
        raise DataError(
            f"{path}: {len(content)} bytes, but its header announces {count} items "
            f"({header + count * item} bytes): truncated or corrupt"
        )
    if not images:
        top = int(np.frombuffer(content, np.uint8, offset=header).max())
        if top >= NUM_CLASSES:
            raise DataError(f"{path}: label {top} out of range 0..{NUM_CLASSES - 1}: corrupt")
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    known = KNOWN_CONTENT.get(name)
    if known is not None and count == known[0] and hashlib.md5(content).hexdigest() != known[1]:
        raise DataError(
            f"{path}: {count} items like the real Fashion-MNIST file, but its "
            f"content's md5 sum is not the real one ({known[1]}): corrupt; fetch it "
            "again"
        )
    return count


def verify(files: dict) -> dict:
    """Verify the four files; return their decompressed contents by IDX name.

    Raises DataError naming the first bad file.
    """
    contents, counts = {}, {}
    for name in FILE_NAMES:
        contents[name] = read_bytes(files[name])
        counts[name] = check_idx(files[name], contents[name])
    for split in ("train", "test"):
        n_img, n_lab = counts[IMAGES[split]], counts[LABELS[split]]
        if n_img != n_lab:
            raise DataError(
                f"{files[IMAGES[split]]} holds {n_img} images but "
                f"{files[LABELS[split]]} {n_lab} labels"
            )
    return contents


# ---------------------------------------------------------------------------------------------
# Preparing torchvision's folder


def _writable_root(data_dir: Path) -> Path:
    """``data_dir`` when we may write there, else a per-user cache folder."""
    try:
        (data_dir / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)
        probe = data_dir / "FashionMNIST" / "raw" / ".write-test"
        probe.touch()
        probe.unlink()
        return data_dir
    except OSError:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        root = cache / "softmax_ext" / "data"
        (root / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)
        return root


def prepare(found: Found, data_dir: PathLike) -> Path:
    """Verify ``found`` and lay it out as torchvision expects; return the root to pass it.

    torchvision's FashionMNIST accepts a root once ``root/FashionMNIST/raw/<name>`` exist
    decompressed (its download() would put them there). Plain files already in that layout are
    used in place; .gz files are decompressed there (the bytes were read to verify them anyway).
    """
    contents = verify(found.files)
    folders = {p.parent for p in found.files.values()}
    plain = all(p.suffix != ".gz" for p in found.files.values())
    if plain and len(folders) == 1:
        folder = folders.pop()
        if folder.parts[-2:] == ("FashionMNIST", "raw"):
            return folder.parent.parent
    root = _writable_root(Path(data_dir))
    raw = root / "FashionMNIST" / "raw"
    for name, content in contents.items():
        target = raw / name
        if (
            target.is_file()
            and target.stat().st_size == len(content)
            and target.read_bytes() == content
        ):
            continue
        tmp = raw / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, target)
    return root


def _download(data_dir: Path) -> Path:
    """torchvision's download (md5-checked by torchvision) into ``data_dir``; return the root."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(data_dir), train=True, download=True)
    return data_dir


def locate(
    data_dir: PathLike, *, download: bool = True, use_env: bool = True, use_debian: bool = True
) -> tuple:
    """Find, verify and prepare Fashion-MNIST; return (torchvision root, where it came from).

    Falls back to torchvision's download when no local copy exists and ``download`` is true.
    Raises DataError for bad files, or naming the three ways to provide data when there is none.
    """
    data_dir = Path(data_dir)
    found = find(data_dir, use_env=use_env, use_debian=use_debian)
    if found is not None:
        return prepare(found, data_dir), found.origin
    reason = "no local copy found"
    if download:
        try:
            root = _download(data_dir)
        except Exception as err:  # no network, a proxy, a failed md5: all mean "no data"
            reason = f"no local copy found, and the download failed: {err}"
        else:
            found = find(root, use_env=False, use_debian=False)
            if found is not None:
                return prepare(found, root), "torchvision download"
    raise DataError(f"Fashion-MNIST: {reason}.\n{how_to_provide(data_dir)}")


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class FashionMNISTTensors:
    """The whole data set on one device: images (N, 1, 28, 28) float32 in [0, 1], labels int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    origin: str


def load(
    data_dir: PathLike, device: Union[str, torch.device] = "cpu", *, download: bool = True
) -> FashionMNISTTensors:
    """Load Fashion-MNIST through torchvision's FashionMNIST as tensors on ``device``.

    Images are converted from uint8 once, on the device, and scaled to [0, 1] as ToTensor does;
    no per-sample transforms are involved.
    """
    from torchvision.datasets import FashionMNIST

    root, origin = locate(data_dir, download=download)
    parts = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=False)
        x = ds.data.to(device).unsqueeze(1).to(torch.float32).div_(255.0)
        parts += [x, ds.targets.to(device=device, dtype=torch.int64)]
    return FashionMNISTTensors(*parts, origin=origin)
