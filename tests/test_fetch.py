import functools
import http.server
import threading

import pytest

from conftest import tiny_spec
from tfjobs.fetch import SourceNotFoundError, fetch_dataset
from tfjobs.spec import SourceSpec
from tfjobs.storage.store import read_json, store_for

CSV = "size,colour,batch,kind\n1.5,red,3,a\n2.5,blue,4,b\n"


def test_palmerpenguins_is_fetched_with_a_manifest(penguins_spec, store):
    result = fetch_dataset(penguins_spec, f"{store}/raw/penguins/2026-11-25")
    manifest = read_json(result.manifest_uri)
    assert manifest["rows"] == result.rows == 344
    assert manifest["columns"][:2] == ["species", "island"]
    assert manifest["source"].startswith("palmerpenguins==")
    assert len(manifest["sha256"]) == 64


def test_a_second_fetch_of_the_same_bytes_rewrites_nothing(penguins_spec, store):
    first = fetch_dataset(penguins_spec, f"{store}/raw")
    manifest = store_for(first.manifest_uri).local_path(first.manifest_uri)
    stamp = manifest.stat().st_mtime_ns
    second = fetch_dataset(penguins_spec, f"{store}/raw")
    assert (first.rewritten, second.rewritten) == (True, False)
    assert manifest.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("as_uri", [False, True])
def test_csv_from_a_path_or_file_uri(tmp_path, store, as_uri):
    path = tmp_path / "in.csv"
    path.write_text(CSV)
    result = fetch_dataset(tiny_spec(), f"{store}/raw", source_uri=path.as_uri() if as_uri else str(path))
    assert result.rows == 2
    assert store_for(result.data_uri).read_bytes(result.data_uri) == CSV.encode()


def test_csv_over_http_without_credentials_in_the_manifest(tmp_path, store):
    (tmp_path / "data.csv").write_text(CSV)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        result = fetch_dataset(tiny_spec(), f"{store}/raw", source_uri=f"http://user:pw@127.0.0.1:{port}/data.csv?k=1")
        assert result.rows == 2
        assert read_json(result.manifest_uri)["source"] == f"http://127.0.0.1:{port}/data.csv"
        with pytest.raises(OSError, match=rf"Could not download http://127.0.0.1:{port}/missing.csv"):
            fetch_dataset(tiny_spec(), f"{store}/raw2", source_uri=f"http://127.0.0.1:{port}/missing.csv")
    finally:
        server.shutdown()


def test_sklearn_bundled_dataset(store):
    spec = tiny_spec(source={"kind": "sklearn", "name": "iris"})
    result = fetch_dataset(spec, f"{store}/raw")
    assert result.rows == 150
    assert "target" in read_json(result.manifest_uri)["columns"]
    with pytest.raises(ValueError, match="no bundled dataset 'irises'.*'iris'"):
        fetch_dataset(tiny_spec(source={"kind": "sklearn", "name": "irises"}), f"{store}/raw2")


def test_tfds_dataset_with_class_labels_as_names(store):
    import tensorflow_datasets as tfds

    spec = tiny_spec(source={"kind": "tfds", "name": "penguins/simple", "split": "train"})
    # TFDS's own mock: examples generated from the dataset's feature spec, nothing downloaded.
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        result = fetch_dataset(spec, f"{store}/raw")
    manifest = read_json(result.manifest_uri)
    assert result.rows == 12 and manifest["source"] == "tfds:penguins/simple/train"
    assert {"species", "island", "body_mass_g"} <= set(manifest["columns"])
    rows = store_for(result.data_uri).read_bytes(result.data_uri).decode().splitlines()
    species = [dict(zip(rows[0].split(","), line.split(",")))["species"] for line in rows[1:]]
    assert set(species) <= {"Adelie", "Chinstrap", "Gentoo"} and species


def test_landing_prefix_reads_the_partitions_file(tmp_path, store):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "2026-11-24.csv").write_text(CSV)
    spec = tiny_spec(source={"kind": "landing", "uri": str(landing)})
    assert fetch_dataset(spec, f"{store}/raw", partition="2026-11-24").rows == 2
    with pytest.raises(SourceNotFoundError, match="No delivery for partition 2026-11-25: expected"):
        fetch_dataset(spec, f"{store}/raw", partition="2026-11-25")


def test_partition_placeholder_in_source_uri_reads_one_delivery_per_day(tmp_path, store):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "2026-11-24.csv").write_text(CSV)
    source = f"{landing}/{{partition}}.csv"
    result = fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-24", source_uri=source)
    assert (result.rows, result.source) == (2, f"{landing}/2026-11-24.csv")
    with pytest.raises(SourceNotFoundError, match=r"No delivery for partition 2026-11-25: expected .*2026-11-25\.csv"):
        fetch_dataset(tiny_spec(), f"{store}/raw2", partition="2026-11-25", source_uri=source)


def test_empty_csv_is_an_error(tmp_path, store):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        fetch_dataset(tiny_spec(), f"{store}/raw", source_uri=str(tmp_path / "empty.csv"))


def test_source_spec_defaults():
    assert SourceSpec(kind="landing", uri="x").pattern == "{partition}.csv"
