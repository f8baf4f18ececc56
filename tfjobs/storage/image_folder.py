"""An image folder on the object store: one sub-folder per class, read as record batches.

::

    <root>/0/img_0001.png          class "0"
    <root>/0/more/img_0002.jpg     class "0" too (deeper folders belong to their top folder)
    <root>/1/img_0003.png          class "1"

The root is a local directory or an ``s3://`` prefix (any store :func:`store_for` serves).
Each file becomes one row: ``file`` (its path under the root: the key that identifies it,
whatever the root), the file's bytes, and its class, the name of its top folder. Files
are listed in path order and read a few at a time, concurrently (S3 answers each GET
after a round trip), into batches of about ``ROW_GROUP_BYTES``: memory does not grow
with the folder, and the same folder gives the same batches from disk or from S3.

Hidden files and folders (``.DS_Store``, ``.git``) are skipped, and so are files
directly under the root (they have no class), with a warning. Whether a file is an
image is not decided here: the validate step decodes each one and quarantines those
that do not decode, with the reason. A root with no class folders, and a class folder
with no files (an empty directory, or an S3 ``<class>/`` marker with nothing under it),
are errors that name them.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from tfjobs.storage.raw_files import ROW_GROUP_BYTES
from tfjobs.storage.store import join, redact, store_for

log = logging.getLogger(__name__)

KEY_COLUMN = "file"
READ_AHEAD = 16  # files read concurrently


class ImageFolderError(ValueError):
    """The folder is not laid out as one sub-folder of images per class."""


@dataclass
class ImageFolder:
    """The files of an image folder, by class: ``files`` are paths under ``root``, in order."""

    root: str
    files: list[str] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # files per class
    skipped: list[str] = field(default_factory=list)  # files with no class folder

    @classmethod
    def list(cls, root: str) -> ImageFolder:
        store = store_for(root)
        prefix = root.rstrip("/") + "/"
        folder = cls(root.rstrip("/"))
        local = store.local_path(root)
        if local is not None:
            if not local.is_dir():
                raise ImageFolderError(f"The image folder {root} does not exist (or is not a directory)")
            # Empty directories hold no files, so the store's listing cannot show them.
            folder.classes = {d.name: 0 for d in local.iterdir() if d.is_dir() and not d.name.startswith(".")}
        for uri in store.list(root):
            path = uri[len(prefix):]
            if any(part.startswith(".") for part in path.split("/")):
                continue
            top, _, rest = path.partition("/")
            if not rest and not path.endswith("/"):
                folder.skipped.append(path)
                continue
            folder.classes.setdefault(top, 0)
            if rest and not rest.endswith("/"):  # a key ending in "/" is an S3 console's folder marker
                folder.files.append(path)
                folder.classes[top] += 1
        folder.classes = dict(sorted(folder.classes.items()))
        folder.check()
        return folder

    def check(self) -> None:
        where = redact(self.root)
        if not self.classes:
            found = f"; it has only files without a class folder: {self.skipped[:5]}" if self.skipped else ""
            raise ImageFolderError(
                f"The image folder {where} has no class folders{found}. Put each class's images in a sub-folder "
                f"named after the class: {where}/<class>/<image file>"
            )
        empty = [name for name, count in self.classes.items() if not count]
        if empty:
            raise ImageFolderError(
                f"Class folder{'s' if len(empty) > 1 else ''} {', '.join(f'{where}/{name}/' for name in empty)} "
                f"of the image folder {where} {'have' if len(empty) > 1 else 'has'} no files: every class needs "
                "images. Add them, or remove the folder."
            )
        if self.skipped:
            log.warning("Skipped %d files directly under %s (no class folder): %s", len(self.skipped), where,
                        self.skipped[:5])

    def batches(self, image_column: str, label_column: str) -> Iterator:
        """``pyarrow.RecordBatch`` es of (``file``, ``image_column``: bytes, ``label_column``: class), in path order."""
        import pyarrow as pa

        store = store_for(self.root)
        schema = batch_schema(image_column, label_column)
        rows: list[tuple[str, bytes]] = []
        size = 0
        with concurrent.futures.ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="image-folder") as pool:
            for start in range(0, len(self.files), READ_AHEAD):
                paths = self.files[start : start + READ_AHEAD]
                for path, data in zip(paths, pool.map(lambda p: store.read_bytes(join(self.root, p)), paths)):
                    rows.append((path, data))
                    size += len(data)
                    if size >= ROW_GROUP_BYTES:  # a cut that depends on the files only, not on how they were read
                        yield _batch(rows, schema, pa)
                        rows, size = [], 0
        if rows:
            yield _batch(rows, schema, pa)


def batch_schema(image_column: str, label_column: str):
    import pyarrow as pa

    if len({KEY_COLUMN, image_column, label_column}) < 3:
        raise ImageFolderError(
            f"An image folder's rows have the columns {KEY_COLUMN!r}, the image and the label: the spec's image "
            f"feature ({image_column!r}) and label ({label_column!r}) need names of their own"
        )
    return pa.schema([(KEY_COLUMN, pa.string()), (image_column, pa.binary()), (label_column, pa.string())])


def _batch(rows: list[tuple[str, bytes]], schema, pa):
    return pa.record_batch([pa.array([path for path, _ in rows], pa.string()),
                            pa.array([data for _, data in rows], pa.binary()),
                            pa.array([path.partition("/")[0] for path, _ in rows], pa.string())], schema=schema)


def write_image_folder(root: str, files: dict[str, bytes]) -> None:
    """Write ``{path under root: file bytes}`` to an image folder (local or ``s3://``)."""
    store = store_for(root)
    for path, data in files.items():
        store.write_bytes(join(root, path), data)


def sklearn_digits_files(image_format: str = "png") -> dict[str, bytes]:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package) as image files by class:
    ``{"<digit>/digit_<i>.png": bytes}``, grey levels 0-16 scaled to 0-255."""
    import numpy as np
    import sklearn.datasets
    import tensorflow as tf

    digits = sklearn.datasets.load_digits()
    encode = {"png": tf.io.encode_png, "jpeg": lambda image: tf.io.encode_jpeg(image, quality=95)}[image_format]
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    return {f"{label}/digit_{i:04d}.{image_format}": encode(image).numpy()
            for i, (image, label) in enumerate(zip(pixels, digits.target))}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tfjobs.storage.image_folder",
        description="Write scikit-learn's handwritten digits as an image folder (one sub-folder per digit), "
        "the layout the image_folder source reads (include/digits.yaml)")
    parser.add_argument("root", help="the folder to write: a path or s3:// prefix")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png")
    args = parser.parse_args(argv)
    files = sklearn_digits_files(args.format)
    write_image_folder(args.root, files)
    print(f"Wrote {len(files)} {args.format.upper()} files to {args.root}/<digit>/")


if __name__ == "__main__":
    main()
