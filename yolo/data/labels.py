"""Finding images and their label files, verifying each pair, and caching the verified result.

Label files follow upstream YOLOv5: ``.../images/x.jpg`` ↔ ``.../labels/x.txt``, one ``class cx cy w h`` row per
object (normalised to the image). A row with 7+ values (``class x1 y1 x2 y2 ...``, an odd count) is a polygon
and is reduced to its bounding box, as upstream does.

What a scan does with a problem:

* image that does not open / verify, has an unknown format or is under 10 px → corrupt: warned and skipped;
* JPEG without its end-of-image marker (truncated) → *not* rewritten (upstream re-saves it in place): when
  OpenCV still decodes it the image is kept with a warning, otherwise it is corrupt;
* image the loader's decoder (OpenCV) cannot decode, even with a valid header → corrupt: warned and skipped
  (checked with a reduced-size decode, which reads the whole compressed stream at a fraction of the cost);
* label rows with the wrong number of columns, non-numbers, NaN or infinite values (class id, coordinates or
  polygon points), negative values or normalised coordinates above 1 (beyond a 1e-5 rounding tolerance), or a
  label file over 16 MiB → the pair is corrupt: warned (naming the label file and line) and skipped;
* duplicate rows → dropped with a warning;
* missing or empty label file → a background image (kept);
* class id ``>= nc`` → :class:`DatasetError` naming the file and line (a wrong ``nc``, not a bad file).

Label files and ``.txt`` image lists are UTF-8; a byte-order mark at the start is ignored.

The scan's result is cached in ``<labels dir>.yolo-hydra.cache`` (or ``<list>.yolo-hydra.cache`` beside a
``.txt`` image list): a name of our own, so a dataset shared with upstream YOLOv5 keeps upstream's
``<labels dir>.cache`` untouched (we never read or write it). The cache is a pickle-free ``.npz`` written
atomically, keyed by a format version and a hash of every image/label path with its size and mtime; anything that
does not match, or that does not look like what we write (compressed members, arrays larger than the file,
inconsistent lengths), is ignored and rebuilt.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from yolo.data.config import DatasetError
from yolo.utils.files import atomic_write, read_lines, remove_stale_temps

log = logging.getLogger("yolo")

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
CACHE_VERSION = 2  # 2: own file name, non-finite label values and undecodable images rejected
CACHE_SUFFIX = ".yolo-hydra.cache"  # upstream YOLOv5 writes "<labels dir>.cache": never the same file
MAX_LABEL_BYTES = 16 << 20  # a label file larger than this is not a label file (bounds what a scan reads)
DECODE_CHECK = cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION  # full stream, 1/64 of the pixels
COORD_TOL = 1e-5  # normalised coordinates may exceed [0, 1] by this much (rounding in label writers)
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


# ---------------------------------------------------------------- file lists
def list_image_files(sources: str | Path | list) -> list[str]:
    """Sorted image files from folders (recursive) and ``.txt`` lists (relative lines → the list's folder)."""
    files: list[str] = []
    for src in sources if isinstance(sources, (list, tuple)) else [sources]:
        p = Path(src).expanduser()
        if p.is_dir():
            files += glob.glob(str(p / "**" / "*.*"), recursive=True)
        elif p.is_file():
            files += _read_image_list(p)
        else:
            raise DatasetError(f"image source does not exist: {p}")
    images = sorted(os.path.normpath(f) for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS)
    if not images:
        raise DatasetError(f"no images found in {sources} (formats: {', '.join(IMG_FORMATS)})")
    return images


def _read_image_list(txt: Path) -> list[str]:
    try:
        lines = read_lines(txt)
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read image list {txt}: {e}") from e
    return [x if os.path.isabs(x) else str(txt.parent / x) for x in lines]


def img2label_paths(img_paths) -> list[str]:
    """``.../images/.../x.jpg`` → ``.../labels/.../x.txt`` (the last ``/images/`` is replaced)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [sb.join(str(p).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt" for p in img_paths]


# ---------------------------------------------------------------- one image/label pair
@dataclass
class ScanResult:
    im_file: str
    labels: np.ndarray | None  # (n, 5) float32 class cx cy w h; None when corrupt
    size: tuple[int, int] | None  # (width, height) after EXIF orientation; None when corrupt
    status: str  # 'labelled' | 'missing' (no label file) | 'empty' (label file without rows) | 'corrupt'
    message: str = ""


class _BadLabel(ValueError):
    """A label file that cannot be used; ``lineno`` is the offending line (0: the file as a whole)."""

    def __init__(self, reason: str, lineno: int = 0):
        super().__init__(reason)
        self.reason, self.lineno = reason, lineno


def verify_image_label(img_path, label_path, nc: int, single_cls: bool = False, prefix: str = "") -> ScanResult:
    """Check one pair; corrupt → ``status='corrupt'`` plus a warning message; class id >= nc → DatasetError."""
    img_path, label_path = str(img_path), str(label_path)
    try:
        size, note = verify_image(img_path)
    except Exception as e:  # PIL raises many types for a bad file
        return ScanResult(img_path, None, None, "corrupt", f"{prefix}WARNING: {img_path}: ignoring corrupt image: {e}")
    try:
        labels, status, label_note = read_label_file(label_path, None if single_cls else nc)
    except _BadLabel as e:
        where = f"{label_path}, line {e.lineno}" if e.lineno else label_path
        return ScanResult(img_path, None, None, "corrupt",
                          f"{prefix}WARNING: {img_path}: ignoring corrupt label {where}: {e.reason}")
    except (OSError, UnicodeDecodeError) as e:
        return ScanResult(img_path, None, None, "corrupt",
                          f"{prefix}WARNING: {img_path}: ignoring unreadable label {label_path}: {e}")
    message = "; ".join(x for x in (note, label_note) if x)
    return ScanResult(img_path, labels, size, status, f"{prefix}WARNING: {img_path}: {message}" if message else "")


def verify_image(path: str) -> tuple[tuple[int, int], str]:
    """(width, height) after EXIF orientation, and a note for a recoverable problem; raises when unusable."""
    with Image.open(path) as im:  # verify() must come straight after open (reading EXIF first loads a PNG)
        w, h = im.size
        fmt = (im.format or "").lower()
        im.verify()
    orientation = 1
    if fmt in ("jpeg", "mpo", "tiff", "webp"):
        with Image.open(path) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    if w < 10 or h < 10:
        raise ValueError(f"image size {w}x{h} is under 10 pixels")
    if fmt not in IMG_FORMATS:
        raise ValueError(f"unsupported image format {fmt or 'unknown'}")
    truncated = fmt in ("jpeg", "mpo") and not _ends_with_eoi(path)
    if not decodes(path):
        raise ValueError("truncated JPEG that cannot be decoded" if truncated else
                         f"{fmt.upper()} header is valid but OpenCV cannot decode the image")
    if truncated:
        return (w, h), "truncated JPEG (no end-of-image marker): kept as decoded, file left unchanged"
    return (w, h), ""


def decodes(path: str) -> bool:
    """Whether the loader's decoder (``cv2.imread``) reads ``path``. A JPEG is decoded at 1/8 scale: every byte of
    its compressed stream is still entropy-decoded (where a fatal error would show), for about half the time and
    1/64 of the memory of a full decode; other formats are decoded fully."""
    return cv2.imread(path, DECODE_CHECK) is not None


def _ends_with_eoi(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read() == b"\xff\xd9"


def read_label_file(path: str, nc: int | None) -> tuple[np.ndarray, str, str]:
    """(labels (n, 5) float32, status, note). ``nc=None`` skips the class-range check (single-class)."""
    if not os.path.isfile(path):
        return np.zeros((0, 5), np.float32), "missing", ""
    size = os.path.getsize(path)
    if size > MAX_LABEL_BYTES:
        raise _BadLabel(f"{size / 2**20:.0f} MiB is over the {MAX_LABEL_BYTES >> 20} MiB limit for a label file")
    with open(path, encoding="utf-8-sig") as f:  # "-sig": a byte-order mark at the start is dropped
        rows = [_parse_row(line, i, path, nc) for i, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    if not rows:
        return np.zeros((0, 5), np.float32), "empty", ""
    labels = np.array(rows, dtype=np.float32)
    np.clip(labels[:, 1:], 0.0, 1.0, out=labels[:, 1:])
    _, first = np.unique(labels, axis=0, return_index=True)
    if len(first) < len(labels):
        dropped = len(labels) - len(first)
        return labels[np.sort(first)], "labelled", f"{dropped} duplicate label row(s) removed"
    return labels, "labelled", ""


def _parse_row(line: str, lineno: int, path: str, nc: int | None) -> list[float]:
    try:
        values = [float(x) for x in line.split()]
    except ValueError:
        raise _BadLabel(f"not numbers: {line.strip()[:60]!r}", lineno) from None
    n = len(values)
    if n != 5 and (n < 7 or n % 2 == 0):
        raise _BadLabel(f"labels require 5 columns (class cx cy w h), {n} found", lineno)
    row = np.array(values)
    if not np.isfinite(row).all():  # before any comparison: NaN compares false with everything
        bad = ", ".join(sorted({str(v) for v in row[~np.isfinite(row)].tolist()}))
        raise _BadLabel(f"non-finite value(s) {bad} in {line.strip()[:60]!r}", lineno)
    cls, coords = values[0], row[1:]
    if cls < 0 or cls != int(cls):
        raise _BadLabel(f"class {cls:g} is not a non-negative integer", lineno)
    if coords.min() < -COORD_TOL:
        raise _BadLabel(f"negative label values {coords[coords < 0].tolist()}", lineno)
    if coords.max() > 1 + COORD_TOL:
        raise _BadLabel(f"non-normalised or out of bounds coordinates {coords[coords > 1].tolist()}", lineno)
    if nc is not None and cls >= nc:
        raise DatasetError(f"{path}:{lineno}: class id {int(cls)} is out of range for nc={nc} "
                           f"(classes 0..{nc - 1}); check 'nc'/'names' in the data config")
    return [cls, *(coords if n == 5 else _polygon_to_box(coords))]


def _polygon_to_box(xy: np.ndarray) -> list[float]:
    x, y = xy[0::2], xy[1::2]
    return [(x.min() + x.max()) / 2, (y.min() + y.max()) / 2, x.max() - x.min(), y.max() - y.min()]


# ---------------------------------------------------------------- whole dataset, with cache
@dataclass
class LabelScan:
    """Valid images (corrupt ones removed) in scan order, with their labels and (width, height) sizes."""

    im_files: list[str]
    labels: list[np.ndarray]
    shapes: np.ndarray  # (n, 2) int: width, height
    labelled: int
    missing: int
    empty: int
    corrupt: int
    messages: list[str] = field(default_factory=list)
    source: str = ""  # what was scanned (for messages)
    from_cache: bool = False

    @property
    def total(self) -> int:
        return self.labelled + self.missing + self.empty + self.corrupt

    @property
    def backgrounds(self) -> int:
        return self.missing + self.empty

    @property
    def instances(self) -> int:
        return int(sum(len(x) for x in self.labels))

    @property
    def summary(self) -> str:
        """Upstream's line: 'images' counts the labelled ones, backgrounds those without a label row."""
        return f"Scanning {self.source}... {_counts_text(self.labelled, self.backgrounds, self.corrupt)}"


def _counts_text(labelled: int, backgrounds: int, corrupt: int) -> str:
    return f"{labelled} images, {backgrounds} backgrounds, {corrupt} corrupt"


def label_cache_path(label_files: list[str], sources=None) -> Path:
    """Our cache beside upstream's: ``<labels dir>.yolo-hydra.cache``, or ``<list>.yolo-hydra.cache`` (the list's
    name without ``.txt``) when the (last) source is a ``.txt`` list. Upstream's ``.cache`` is another file."""
    last = Path((sources if isinstance(sources, (list, tuple)) else [sources])[-1]) if sources else None
    base = last.with_suffix("") if last is not None and last.is_file() else Path(label_files[0]).parent
    return base.with_name(base.name + CACHE_SUFFIX)


def writable_cache_path(path: Path) -> Path:
    """``path`` when its folder is writable, else the same name under ``$YOLO_CACHE_DIR`` (``~/.cache/yolo``).

    A folder whose permission bits grant nobody write access counts as read-only even for root (who could
    write there anyway): shared, read-only datasets stay untouched.
    """
    path = Path(path)
    if _writable_dir(path.parent):
        return path
    root = Path(os.environ.get("YOLO_CACHE_DIR") or Path.home() / ".cache" / "yolo")
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return root / f"{tag}-{path.name}"


def _writable_dir(d: Path) -> bool:
    try:
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def dataset_hash(im_files: list[str], label_files: list[str], key: str = "") -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{key}".encode())
    for f in (*im_files, *label_files):
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|-\n".encode())
    return h.hexdigest()


def scan_dataset(img_files: list[str], nc: int, cache_path: str | Path | None = None, prefix: str = "",
                 workers: int = 8, single_cls: bool = False) -> LabelScan:
    """Verify every image/label pair (threads, progress bar) or reuse a matching cache; write the cache."""
    img_files = [str(f) for f in img_files]
    label_files = img2label_paths(img_files)
    source = str(Path(label_files[0]).parent)
    key = dataset_hash(img_files, label_files, "single_cls" if single_cls else f"nc={nc}")
    scan = load_label_cache(cache_path, key) if cache_path else None
    if scan is not None:
        scan.source = source
        tqdm(desc=f"{prefix}{scan.summary}", total=scan.total, initial=scan.total).close()
    else:
        results = _verify_all(img_files, label_files, nc, single_cls, prefix, workers, f"{prefix}Scanning {source}...")
        scan = _collect(results, source)
        if cache_path:
            save_label_cache(cache_path, scan, key, prefix)
    for msg in scan.messages:
        log.warning(msg)
    if not scan.im_files:
        raise DatasetError(f"{prefix}no usable images in {source}: all {scan.total} image/label pairs are corrupt "
                           f"(first: {scan.messages[0] if scan.messages else '?'})")
    return scan


def _verify_all(img_files, label_files, nc, single_cls, prefix, workers, desc) -> list[ScanResult]:
    args = [(i, lb, nc, single_cls, prefix) for i, lb in zip(img_files, label_files)]
    counts = {"labelled": 0, "missing": 0, "empty": 0, "corrupt": 0}
    results = []
    threads = max(1, min(workers, len(args), os.cpu_count() or 1))  # more threads than cores only contend
    with ThreadPool(threads) as pool, tqdm(total=len(args), desc=desc) as bar:
        for r in pool.imap(_verify_star, args, chunksize=8):
            results.append(r)
            counts[r.status] += 1
            text = _counts_text(counts["labelled"], counts["missing"] + counts["empty"], counts["corrupt"])
            bar.set_description(f"{desc} {text}", refresh=False)
            bar.update()
    return results


def _verify_star(args) -> ScanResult:
    return verify_image_label(*args)


def _collect(results: list[ScanResult], source: str) -> LabelScan:
    ok = [r for r in results if r.status != "corrupt"]
    count = {s: sum(r.status == s for r in results) for s in ("labelled", "missing", "empty", "corrupt")}
    return LabelScan(im_files=[r.im_file for r in ok], labels=[r.labels for r in ok],
                     shapes=np.array([r.size for r in ok], dtype=np.int64).reshape(-1, 2),
                     messages=[r.message for r in results if r.message], source=source, **count)


def save_label_cache(path: str | Path, scan: LabelScan, key: str, prefix: str = "") -> bool:
    """Write atomically (:func:`yolo.utils.files.atomic_write`); an unwritable location is a warning, never an
    error. Temporary files a killed writer left beside the cache are removed first."""
    path = Path(path)
    lengths = np.array([len(x) for x in scan.labels], dtype=np.int64)
    arrays = dict(version=np.array(CACHE_VERSION), hash=np.array(key), files=np.array(scan.im_files, dtype=str),
                  shapes=scan.shapes.astype(np.int64), lengths=lengths,
                  labels=np.concatenate(scan.labels) if scan.labels else np.zeros((0, 5), np.float32),
                  counts=np.array([scan.labelled, scan.missing, scan.empty, scan.corrupt], dtype=np.int64),
                  messages=np.array(scan.messages, dtype=str))
    try:
        remove_stale_temps(path.parent, path.name)
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        log.warning(f"{prefix}WARNING: cache directory {path.parent} is not writable, labels not cached: {e}")
        return False
    log.info(f"{prefix}New cache created: {path}")
    return True


def load_label_cache(path: str | Path, key: str) -> LabelScan | None:
    """The cached scan when ``path`` holds one for exactly this version and hash; otherwise None.

    The file is read as untrusted data: only what :func:`save_label_cache` writes is accepted (uncompressed
    arrays of plain dtypes, none larger than the file, lengths that agree); anything else is None (rebuilt).
    """
    try:
        with zipfile.ZipFile(path) as z:
            head = _read_npz(z, ("version", "hash"))
            if head["version"].shape != () or int(head["version"]) != CACHE_VERSION or str(head["hash"]) != key:
                return None
            arrays = _read_npz(z, ("files", "shapes", "lengths", "labels", "counts", "messages"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, unreadable, foreign
        return None
    files, shapes, lengths, labels, counts = (arrays[k] for k in ("files", "shapes", "lengths", "labels", "counts"))
    n = len(files)
    if (files.ndim != 1 or shapes.shape != (n, 2) or lengths.shape != (n,) or labels.ndim != 2
            or labels.shape[1] != 5 or counts.shape != (4,) or (lengths < 0).any()
            or int(lengths.sum()) != len(labels) or int(counts[:3].sum()) != n or (counts < 0).any()
            or not np.isfinite(labels).all()):
        return None
    labels = labels.astype(np.float32)
    split = np.split(labels, np.cumsum(lengths)[:-1]) if n else []
    labelled, missing, empty, corrupt = (int(x) for x in counts)
    return LabelScan(im_files=[str(x) for x in files], labels=split, shapes=shapes.astype(np.int64),
                     labelled=labelled, missing=missing, empty=empty, corrupt=corrupt,
                     messages=[str(x) for x in arrays["messages"].reshape(-1)], from_cache=True)


def _read_npz(z: zipfile.ZipFile, keys) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an ``.npz`` without trusting it: each member must be stored uncompressed (so it is no
    larger than the file) and its header's shape and dtype must describe exactly the bytes it holds, before
    anything is allocated; no objects (no pickles)."""
    out = {}
    for key in keys:
        info = z.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{key}: compressed member")
        with z.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{key}: .npy format {version}")
            nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if dtype.hasobject or f.tell() + nbytes != info.file_size:
                raise ValueError(f"{key}: header does not describe its data")
            data = np.frombuffer(f.read(nbytes), dtype=dtype)
        out[key] = data.reshape(shape, order="F" if fortran else "C")
    return out
