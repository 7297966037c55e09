"""Which images a caption-batch run covers, and reading one: local files, folders (recursive), globs and list
files, or URIs that pyarrow's file systems read (s3://, gs://, file://, ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgecap.runtime.errors import DataError
from edgecap.runtime.preprocess import MAX_PIXELS, decode_image, read_rgb
from edgecap.runtime.sources import folder_images, glob_images, is_image

LIST_EXTS = (".txt", ".lst")


def image_paths(sources: list[str], warn: Callable[[str], None], recursive: bool = True) -> list[str]:
    """Every image path the sources name, each once, in order (folders with their subfolders unless not
    `recursive`). A source that names nothing is warned about; when none names anything, its error ends the
    command."""
    paths, errors = [], []
    for source in sources:
        try:
            paths += expand(source, recursive)
        except DataError as e:
            errors.append(e)
            warn(str(e))
    if not paths:
        raise errors[0] if errors else DataError("no images to caption")
    return list(dict.fromkeys(paths))


def expand(source: str, recursive: bool = True) -> list[str]:
    """One source's image paths. A folder's are caption-run's (`folder_images`: its subfolders' too unless not
    `recursive`; broken links listed, to become error rows). Paths in a list file are taken as they are (relative
    ones from the list's folder; URIs such as s3://... stay URIs): one that is missing gives an error row, not a
    stop."""
    if "://" in source:
        return expand_uri(source)
    path = Path(source)
    if path.is_dir():
        return [str(p) for p in folder_images(path, recursive)]
    if path.is_file():
        if path.suffix.lower() in LIST_EXTS:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            return [ln if "://" in ln else str(path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
        if is_image(path):
            return [source]
        raise DataError(f"not an image or list file: {source} (unknown extension {path.suffix!r})")
    if any(c in source for c in "*?["):
        if not (found := [str(p) for p in glob_images(source)]):
            raise DataError(f"no image files match: {source}")
        return found
    raise DataError(f"no such file or folder: {source}")


def expand_uri(uri: str) -> list[str]:
    """An image URI, or every image under a folder URI, through pyarrow's file systems."""
    from pyarrow import fs

    scheme = uri.split("://", 1)[0]
    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.Directory:
            infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
            return sorted(f"{scheme}://{i.path}" for i in infos if i.type == fs.FileType.File and is_image(i.path))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot list {uri}: {str(e).splitlines()[0]}") from None
    if info.type != fs.FileType.File:
        raise DataError(f"no such file or folder: {uri}")
    return [uri]


def read_image(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 from a local path or a URI; DataError when it cannot be read or decoded, or is over
    `max_pixels` (read from its header)."""
    if "://" not in path:
        return read_rgb(path, max_pixels)
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
    return decode_image(data, path, max_pixels)
