"""What ``python -m yolo.predict source=...`` reads: files, folders, globs, ``.txt`` lists and videos.

:func:`resolve_sources` turns the ``source`` setting (one entry or a list) into the ordered list of image and video
files it names, and refuses, in one :class:`SourceError` line, a path that does not exist, a glob that matches
nothing, a folder or list with no image or video in it, and a video that OpenCV cannot open. It reads no pixels
beyond a video's header, so the config check calls it before any run folder is made.

:func:`iter_frames` then yields one :class:`Frame` per image and per video frame. An image that OpenCV cannot
decode (a truncated or corrupt file, a text file named ``.jpg``) is skipped with a warning naming it.

Rules: a folder contributes its own image and video files (not its sub-folders', as upstream's detect.py), in
sorted order; a glob (``*``, ``?``, ``[``; ``**`` recurses) its matches, sorted; a ``.txt`` file one path per line
(relative lines are relative to the list's folder, as in dataset lists; a line may be a file, a folder or a
glob). A file listed twice is read once. Other files in a folder or glob are ignored; an explicitly named file
that is neither an image nor a video is an error.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from yolo.errors import UserError
from yolo.utils.files import read_lines

log = logging.getLogger("yolo")

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")  # as the datasets'
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
GLOB_CHARS = ("*", "?", "[")
DEFAULT_FPS = 30.0  # a video whose header gives no usable frame rate is written at this rate


class SourceError(UserError):
    """A ``source`` entry that cannot be used; the message starts with ``source:`` and names the entry."""


def kind_of(path: str | os.PathLike) -> str | None:
    """``'image'``, ``'video'`` or None, by the file name's extension."""
    ext = str(path).rsplit(".", 1)[-1].lower() if "." in Path(path).name else ""
    return "image" if ext in IMG_FORMATS else "video" if ext in VID_FORMATS else None


def _media(paths: Iterable[str]) -> list[str]:
    return sorted(os.path.normpath(p) for p in paths if os.path.isfile(p) and kind_of(p))


def _expand(entry: str, base: Path | None, in_list: Path | None) -> list[str]:
    """The image and video files one ``source`` entry names (``base``: the folder relative entries are in)."""
    where = f" (listed in {in_list})" if in_list else ""
    raw = os.path.expanduser(entry)
    if base is not None and not os.path.isabs(raw):
        raw = str(base / raw)
    if any(c in raw for c in GLOB_CHARS) and not os.path.exists(raw):
        found = _media(glob.glob(raw, recursive=True))
        if not found:
            raise SourceError(f"source: {entry!r}{where} matches no image or video file")
        return found
    p = Path(raw)
    if p.is_dir():
        found = _media(str(f) for f in p.iterdir())
        if not found:
            raise SourceError(f"source: folder {p}{where} holds no image or video file "
                              f"(images: {', '.join(IMG_FORMATS)}; videos: {', '.join(VID_FORMATS)})")
        return found
    if not p.is_file():
        raise SourceError(f"source: {p}{where} does not exist")
    if p.suffix.lower() == ".txt" and in_list is None:
        return _expand_list(p)
    if kind_of(p) is None:
        raise SourceError(f"source: {p}{where} is not an image or video file "
                          f"(images: {', '.join(IMG_FORMATS)}; videos: {', '.join(VID_FORMATS)})")
    return [os.path.normpath(str(p))]


def _expand_list(txt: Path) -> list[str]:
    try:
        lines = read_lines(txt)
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"source: cannot read the list {txt}: {e}") from None
    if not lines:
        raise SourceError(f"source: the list {txt} names no file")
    return [f for line in lines for f in _expand(line, txt.parent, txt)]


def as_entries(source: Any) -> list[str]:
    """The ``source`` setting as a list of strings (one entry, or a list / ListConfig of them)."""
    if source is None:
        raise SourceError("source: required: give source=path (a file, folder, glob, .txt list or video)")
    items = [source] if isinstance(source, (str, bytes, int, float, os.PathLike)) else list(source)
    if not items:
        raise SourceError("source: the list is empty")
    entries = [os.fsdecode(x) if isinstance(x, (bytes, os.PathLike)) else str(x) for x in items]
    if any(not e.strip() for e in entries):
        raise SourceError("source: an empty path: give a file, folder, glob, .txt list or video")
    return entries


def resolve_sources(source: Any, check_videos: bool = True) -> list[str]:
    """The image and video files ``source`` names, in order, each once. Raises :class:`SourceError`."""
    files = [f for entry in as_entries(source) for f in _expand(entry, None, None)]
    files = list(dict.fromkeys(files))
    if check_videos:
        for f in files:
            if kind_of(f) == "video":
                video_info(f)
    return files


def video_info(path: str) -> tuple[int, float]:
    """(frame count, frames per second) from the header of the video at ``path``; SourceError if it won't open."""
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise SourceError(f"source: cannot open the video {path} (not a video, or no codec for it)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    fps = fps if isinstance(fps, float) and math.isfinite(fps) and fps > 0 else DEFAULT_FPS
    return max(count, 0), fps


@dataclass
class Frame:
    """One image to predict on: a BGR ``uint8`` array and where it came from."""

    image: np.ndarray
    path: str | None = None
    frame: int | None = None  # 1-based frame number within a video; None for an image
    fps: float | None = None  # the video's frame rate (for writing it back)

    @property
    def is_video(self) -> bool:
        return self.frame is not None


def read_image(path: str) -> np.ndarray | None:
    """``path`` decoded by OpenCV as a 3-channel BGR ``uint8`` array (EXIF orientation applied), or None."""
    try:
        return cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def as_bgr(image: np.ndarray, what: str = "image") -> np.ndarray:
    """A caller's array as a contiguous (h, w, 3) ``uint8`` BGR image: grey (h, w) is expanded, BGRA drops A."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise SourceError(f"source: {what} must be a uint8 numpy array (BGR), got "
                          f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise SourceError(f"source: {what} must be an (h, w, 3) BGR array, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _video_frames(path: str) -> Iterator[Frame]:
    _, fps = video_info(path)
    cap = cv2.VideoCapture(path)
    n = 0
    try:
        while True:
            ok, im = cap.read()
            if not ok or im is None:
                break
            n += 1
            yield Frame(im, path, n, fps)
    finally:
        cap.release()
    if n == 0:
        log.warning(f"WARNING: {path}: the video opened but no frame could be read, skipped")


def iter_frames(files: Iterable[str]) -> Iterator[Frame]:
    """One :class:`Frame` per image and per video frame of ``files``; an undecodable image is skipped with a
    warning naming it."""
    for path in files:
        if kind_of(path) == "video":
            yield from _video_frames(path)
            continue
        im = read_image(path)
        if im is None:
            log.warning(f"WARNING: {path}: cannot be decoded as an image (corrupt or truncated?), skipped")
            continue
        yield Frame(im, path)


def count_frames(files: Iterable[str]) -> int:
    """How many frames :func:`iter_frames` will yield at most (video headers may miscount): the progress total."""
    return sum(video_info(f)[0] if kind_of(f) == "video" else 1 for f in files)
