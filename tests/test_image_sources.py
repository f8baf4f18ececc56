"""Sources of images without a CSV detour: image folders (local or S3) and TFDS, to Parquet raw data.

A few dozen of scikit-learn's digits written as PNG files make the folders; TFDS runs
under its own mock (``tfds.testing.mock_data``), offline.
"""

import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import tiny_spec
from s3_server import moto_s3
from tfjobs.fetch import fetch_dataset
from tfjobs.shard import shard_dataset
from tfjobs.storage import s3
from tfjobs.storage.image_folder import ImageFolderError, sklearn_digits_files, write_image_folder
from tfjobs.storage.store import read_json
from tfjobs.validate import validate_dataset

IMAGE_SPEC = {
    "source": {"kind": "image_folder", "uri": "unused"},
    "label": {"name": "label", "task": "classification", "classes": [str(d) for d in range(10)]},
    "features": {"image": {"kind": "image", "height": 8, "width": 8, "channels": 1}},
    "shards": {"train": 2, "eval": 1, "test": 1},
}


def image_spec(**overrides):
    return tiny_spec(**{**IMAGE_SPEC, **overrides})


@pytest.fixture(scope="module")
def digit_files():
    """60 digits, 6 per class, as PNG files by class folder."""
    files = sklearn_digits_files()
    per_class: dict[str, int] = {}
    kept = {}
    for path, data in files.items():
        digit = path.split("/")[0]
        if per_class.get(digit, 0) < 6:
            kept[path] = data
            per_class[digit] = per_class.get(digit, 0) + 1
    return kept


def run_data_steps(spec, store, source):
    raw = fetch_dataset(spec, f"{store}/raw", source_uri=source)
    validated = validate_dataset(spec, f"{store}/raw", f"{store}/validated")
    shards = shard_dataset(spec, f"{store}/validated", f"{store}/shards")
    return raw, validated, shards


def test_an_image_folder_is_fetched_to_parquet_with_file_keys_and_class_labels(tmp_path, digit_files):
    root = tmp_path / "digits"
    write_image_folder(str(root), {**digit_files, "3/extra/deeper.png": digit_files["3/digit_0003.png"],
                                   "README.txt": b"no class", ".DS_Store": b"hidden", "4/.hidden.png": b"x"})
    raw = fetch_dataset(image_spec(), str(tmp_path / "raw"), source_uri=str(root))
    manifest = read_json(raw.manifest_uri)
    assert (manifest["format"], manifest["file"], manifest["rows"]) == ("parquet", "data.parquet", 61)
    assert manifest["columns"] == ["file", "image", "label"] and manifest["source"] == str(root)
    frame = pd.read_parquet(raw.data_uri)
    assert frame["file"].tolist() == sorted(frame["file"])  # path order: the same from any store
    assert frame.loc[frame["file"] == "3/extra/deeper.png", "label"].item() == "3"  # its top folder is its class
    assert frame.set_index("file")["image"]["0/digit_0000.png"] == digit_files["0/digit_0000.png"]  # bytes as they are
    assert frame["label"].value_counts().to_dict() == {**{str(d): 6 for d in range(10)}, "3": 7}


def test_not_an_image_and_a_truncated_png_in_a_class_folder_are_quarantined_naming_the_file(tmp_path, digit_files):
    truncated = digit_files["5/digit_0005.png"][:-20]
    root = tmp_path / "digits"
    write_image_folder(str(root), {**digit_files, "5/digit_0005.png": truncated, "7/notes.txt": b"taken on Monday"})
    _, validated, shards = run_data_steps(image_spec(max_quarantine_fraction=0.1), tmp_path / "store", str(root))
    assert (validated.rows_in, validated.rows_valid, validated.rows_quarantined) == (61, 59, 2)
    assert validated.reasons == {
        f"image: cannot be decoded as an image (Invalid PNG data, size {len(truncated)})": 1,
        "image: cannot be decoded as an image (Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP "
        "required.)": 1,
    }
    quarantine = pd.read_csv(validated.quarantine_uri, dtype=str)
    assert quarantine["file"].tolist() == ["5/digit_0005.png", "7/notes.txt"]
    assert quarantine["image"].tolist()[1] == "<15 bytes: 74616b656e206f6e...>"  # text shows as its size and bytes
    assert quarantine["_line"].tolist() == ["31", "49"]  # rows of the raw Parquet file, from 1
    assert sum(shards.records.values()) == 59


@pytest.mark.parametrize("layout, message", [
    ({}, r"The image folder .*/digits does not exist"),
    ({"README.txt": b"x"}, r"has no class folders; it has only files without a class folder: \['README.txt'\]"),
    ({"0/a.png": b"x", "1/": None}, r"Class folder .*/digits/1/ of the image folder .*/digits has no files"),
])
def test_an_empty_root_or_class_folder_fails_naming_it(tmp_path, layout, message):
    root = tmp_path / "digits"
    for path, data in layout.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            (root / path).mkdir(exist_ok=True)
        else:
            (root / path).write_bytes(data)
    with pytest.raises(ImageFolderError, match=message):
        fetch_dataset(image_spec(), str(tmp_path / "raw"), source_uri=str(root))


def test_an_empty_root_directory_fails_naming_it(tmp_path):
    (tmp_path / "digits").mkdir()
    with pytest.raises(ImageFolderError, match=f"The image folder {tmp_path}/digits has no class folders. Put each"):
        fetch_dataset(image_spec(), str(tmp_path / "raw"), source_uri=str(tmp_path / "digits"))


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as endpoint:
        yield endpoint


def test_the_same_folder_on_s3_gives_the_same_shards_as_on_local_disk(tmp_path, endpoint, digit_files):
    write_image_folder(str(tmp_path / "digits"), digit_files)
    s3.configure(lambda: endpoint.client(), source="the test endpoint")
    try:
        write_image_folder(f"s3://{endpoint.bucket}/landing/digits", digit_files)
        on_s3 = run_data_steps(image_spec(), f"s3://{endpoint.bucket}/store", f"s3://{endpoint.bucket}/landing/digits")
        manifest_on_s3 = read_json(on_s3[2].manifest_uri)
        # An S3 console's "create folder": an empty class, as a key ending in "/".
        endpoint.client().put_object(Bucket=endpoint.bucket, Key="landing/digits/10/", Body=b"")
        with pytest.raises(ImageFolderError, match=f"Class folder s3://{endpoint.bucket}/landing/digits/10/ .* no files"):
            fetch_dataset(image_spec(), f"s3://{endpoint.bucket}/raw2", source_uri=f"s3://{endpoint.bucket}/landing/digits")
    finally:
        s3.configure()
    on_disk = run_data_steps(image_spec(), str(tmp_path / "store"), str(tmp_path / "digits"))
    assert on_s3[0].sha256 == on_disk[0].sha256  # the raw Parquet file, byte for byte
    manifest_on_disk = read_json(on_disk[2].manifest_uri)
    assert manifest_on_s3["splits"] == manifest_on_disk["splits"]  # every shard's records, bytes and SHA-256
    assert sum(split["records"] for split in manifest_on_disk["splits"].values()) == 60


MNIST = {
    "source": {"kind": "tfds", "name": "mnist", "splits": {"train": "train[:90%]", "eval": "train[90%:]",
                                                            "test": "test"}},
    "label": {"name": "label", "task": "classification", "classes": [str(d) for d in range(10)]},
    "features": {"image": {"kind": "image", "height": 28, "width": 28, "channels": 1}},
}


@pytest.fixture
def no_downloads(monkeypatch):
    """Any download TFDS tried would fail the test."""
    import socket

    from tensorflow_datasets.core.download import download_manager

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(download_manager.DownloadManager, "download", refuse)
    monkeypatch.setattr(download_manager.DownloadManager, "download_and_extract", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_tfds_images_go_straight_through_with_their_slices_as_splits(tmp_path, no_downloads):
    import tensorflow_datasets as tfds

    spec = tiny_spec(**MNIST)
    assert spec.split.column == "_split"  # source.splits: the rows carry their split
    with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path / "tfds")):
        raw = fetch_dataset(spec, str(tmp_path / "store/raw"))
    manifest = read_json(raw.manifest_uri)
    assert manifest["source"] == "tfds:mnist/train=train[:90%]+eval=train[90%:]+test=test"
    assert manifest["columns"] == ["image", "label", "_split"] and manifest["format"] == "parquet"
    frame = pd.read_parquet(raw.data_uri)
    assert frame["_split"].value_counts().to_dict() == {"train": 20, "eval": 20, "test": 20}
    assert all(image.startswith(b"\x89PNG") for image in frame["image"])  # the encoded files, never decoded
    assert tf.io.decode_png(frame["image"][0]).shape == (28, 28, 1)
    assert set(frame["label"]) <= {str(d) for d in range(10)}  # class names
    validate_dataset(spec, str(tmp_path / "store/raw"), str(tmp_path / "store/validated"))
    shards = shard_dataset(spec, str(tmp_path / "store/validated"), str(tmp_path / "store/shards"))
    assert shards.records == {"train": 20, "eval": 20, "test": 20}  # each row in its source split, not hashed


def test_a_tfds_name_that_does_not_exist_is_a_clear_error_without_network(tmp_path, no_downloads):
    with pytest.raises(ValueError, match=r"TensorFlow Datasets .* has no dataset 'mnsit'; did you mean 'mnist'"):
        fetch_dataset(tiny_spec(**{**MNIST, "source": {"kind": "tfds", "name": "mnsit"}}), str(tmp_path / "raw"))


def test_a_split_column_assigns_rows_and_unknown_splits_are_quarantined(tmp_path):
    spec = tiny_spec(split={"column": "fold"}, max_quarantine_fraction=0.5)
    (tmp_path / "in.csv").write_text("size,colour,batch,kind,fold\n" + "".join(
        f"{i},red,1,{'ab'[i % 2]},{['train', 'eval', ' test', 'holdout'][i % 4]}\n" for i in range(40)))
    fetch_dataset(spec, f"{tmp_path}/raw", source_uri=str(tmp_path / "in.csv"))
    validated = validate_dataset(spec, f"{tmp_path}/raw", f"{tmp_path}/validated")
    assert validated.reasons == {"fold: split is not one of train, eval, test": 10}
    assert shard_dataset(spec, f"{tmp_path}/validated", f"{tmp_path}/shards").records == {
        "train": 10, "eval": 10, "test": 10}


def test_the_digits_folder_cli_writes_one_folder_per_digit(tmp_path):
    from tfjobs.storage.image_folder import ImageFolder, main

    main([str(tmp_path / "digits")])
    folder = ImageFolder.list(str(tmp_path / "digits"))
    assert folder.classes == {str(d): n for d, n in zip(range(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])}
    assert json.dumps(folder.files[:1]) == '["0/digit_0000.png"]'
