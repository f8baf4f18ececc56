import datetime as dt

import pandas as pd
import pytest

from conftest import loopback_http, tiny_spec
from tfjobs.deadlines import utc_now, utc_text
from tfjobs.fetch import DeliveryPending, SourceAuth, SourceNotFoundError, fetch_dataset, fetch_when_delivered
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


def test_csv_over_http_without_the_query_in_the_manifest(store):
    with loopback_http() as server:
        server.files["/data.csv"] = CSV.encode()
        result = fetch_dataset(tiny_spec(), f"{store}/raw", source_uri=server.url("/data.csv?k=1"))
        assert result.rows == 2
        assert read_json(result.manifest_uri)["source"] == server.url("/data.csv")
        with pytest.raises(OSError, match=f"Could not download {server.url('/missing.csv')}"):
            fetch_dataset(tiny_spec(), f"{store}/raw2", source_uri=server.url("/missing.csv"))


def test_credentials_in_a_uri_are_refused_before_any_request(store):
    with loopback_http() as server:
        server.files["/data.csv"] = CSV.encode()
        uri = server.url("/data.csv").replace("://", "://user:s3cret@")
        for source in (uri, uri.replace("data.csv", "{partition}.csv")):
            with pytest.raises(ValueError, match="carries credentials.*HTTP connection.*source_conn_id") as refused:
                fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-25", source_uri=source)
            assert "s3cret" not in str(refused.value)
        assert server.requests == []


def test_credentials_follow_a_redirect_on_their_origin_only(store):
    """A server on port A redirects to itself and to a server on port B: only A sees the Authorization header."""
    with loopback_http() as a, loopback_http() as b:
        a.files["/data.csv"] = b.files["/data.csv"] = CSV.encode()
        a.redirects["/same"] = a.url("/data.csv")
        a.redirects["/elsewhere"] = b.url("/data.csv")
        auth = SourceAuth.basic(a.url("/"), "user", "s3cret")
        expected = auth.headers["Authorization"]
        for path in ("/same", "/elsewhere"):
            assert fetch_dataset(tiny_spec(), f"{store}/raw{path}", source_uri=a.url(path), auth=auth).rows == 2
        assert [(m, p, h.get("Authorization")) for m, p, h in a.requests] == [
            ("GET", "/same", expected), ("GET", "/data.csv", expected), ("GET", "/elsewhere", expected),
        ]
        assert [(m, p, h.get("Authorization")) for m, p, h in b.requests] == [("GET", "/data.csv", None)]
        assert "s3cret" not in repr(auth)


def test_credentials_are_for_their_origin_and_http_only(store, tmp_path):
    (tmp_path / "in.csv").write_text(CSV)
    auth = SourceAuth.basic("https://landing.example.com", "user", "s3cret")
    with pytest.raises(ValueError, match="not at https://landing.example.com:443, the only origin"):
        fetch_dataset(tiny_spec(), f"{store}/raw", source_uri="https://elsewhere.example.com/x.csv", auth=auth)
    with pytest.raises(ValueError, match="not http"):
        fetch_dataset(tiny_spec(), f"{store}/raw", source_uri=str(tmp_path / "in.csv"), auth=auth)


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
    assert manifest["format"] == "parquet" and result.data_uri.endswith("data.parquet")  # TFDS rows, typed
    species = pd.read_parquet(result.data_uri)["species"].tolist()
    assert set(species) <= {"Adelie", "Chinstrap", "Gentoo"} and species


def test_landing_prefix_reads_the_partitions_file(tmp_path, store):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "2026-11-24.csv").write_text(CSV)
    spec = tiny_spec(source={"kind": "landing", "uri": str(landing), "deadline": "6h"})
    assert fetch_dataset(spec, f"{store}/raw", partition="2026-11-24").rows == 2
    # The day ended long ago: 6 hours after its end has passed, so there is nothing to wait for.
    with pytest.raises(SourceNotFoundError, match="No delivery for 2026-11-25 by 2026-11-26T06:00:00Z: expected"):
        fetch_dataset(spec, f"{store}/raw", partition="2026-11-25")


def test_partition_placeholder_in_source_uri_reads_one_delivery_per_day(tmp_path, store):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "2026-11-24.csv").write_text(CSV)
    source = f"{landing}/{{partition}}.csv"
    result = fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-24", source_uri=source)
    assert (result.rows, result.source) == (2, f"{landing}/2026-11-24.csv")
    with pytest.raises(SourceNotFoundError, match=r"No delivery for 2026-11-25 by 2026-11-26T06:00:00Z: expected .*2026-11-25\.csv"):
        fetch_dataset(tiny_spec(), f"{store}/raw2", partition="2026-11-25", source_uri=source)


def test_a_delivery_before_its_deadline_is_pending_until_the_next_poke(tmp_path, store):
    source = f"{tmp_path}/{{partition}}.csv"
    deadline = (utc_now() + dt.timedelta(hours=1)).replace(microsecond=0)
    before = utc_now()
    with pytest.raises(DeliveryPending) as pending:
        fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-25", source_uri=source,
                      deadline=utc_text(deadline), poke_interval="90s")
    assert pending.value.deadline == deadline
    assert before + dt.timedelta(seconds=90) <= pending.value.next_poke <= utc_now() + dt.timedelta(seconds=90)
    # The last poke is at the deadline, not after it.
    with pytest.raises(DeliveryPending) as pending:
        fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-25", source_uri=source,
                      deadline=utc_text(deadline), poke_interval="2h")
    assert pending.value.next_poke == deadline
    assert not store_for(store).exists(f"{store}/raw")


def test_the_command_line_waits_for_a_late_delivery_in_process(tmp_path, store):
    source = f"{tmp_path}/{{partition}}.csv"
    waits = []

    def deliver_while_waiting(seconds):
        waits.append(seconds)
        (tmp_path / "2026-11-25.csv").write_text(CSV)

    result = fetch_when_delivered(tiny_spec(), f"{store}/raw", "2026-11-25", source,
                                  deadline=utc_text(utc_now() + dt.timedelta(hours=1)), poke_interval="30s",
                                  sleep=deliver_while_waiting)
    assert result.rows == 2 and len(waits) == 1 and 29 < waits[0] <= 30


def test_an_http_delivery_is_poked_with_head_requests_through_redirects(store):
    with loopback_http() as server:
        source = server.url("/landing/{partition}.csv")
        server.redirects["/landing/2026-11-25.csv"] = server.url("/files/2026-11-25.csv")
        deadline = utc_text(utc_now() + dt.timedelta(hours=1))
        with pytest.raises(DeliveryPending):
            fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-25", source_uri=source, deadline=deadline)
        server.files["/files/2026-11-25.csv"] = CSV.encode()
        assert fetch_dataset(tiny_spec(), f"{store}/raw", partition="2026-11-25", source_uri=source).rows == 2
        assert [m for m, _, _ in server.requests] == ["HEAD", "HEAD", "HEAD", "HEAD", "GET", "GET"]


def test_empty_csv_is_an_error(tmp_path, store):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        fetch_dataset(tiny_spec(), f"{store}/raw", source_uri=str(tmp_path / "empty.csv"))


def test_source_spec_defaults():
    source = SourceSpec(kind="landing", uri="x")
    assert (source.pattern, source.deadline, source.poke_interval) == ("{partition}.csv", "6h", "5m")


TSV_SOURCE = {"kind": "csv", "uri": "unused", "delimiter": "\t", "quoting": "none", "header": False,
              "column_names": ["kind", "colour"]}


def test_rows_are_counted_as_the_source_lays_them_out(tmp_path, store):
    # No header, tabs, quotes that would join two lines under CSV quoting, a blank line, a Latin-1 byte.
    (tmp_path / "in.tsv").write_bytes(b'a\t"hi\nb\tbye"\n\nb\tcaf\xe9\n')
    spec = tiny_spec(source=TSV_SOURCE)
    result = fetch_dataset(spec, f"{store}/raw", source_uri=str(tmp_path / "in.tsv"))
    manifest = read_json(result.manifest_uri)
    assert (result.rows, manifest["columns"]) == (3, ["kind", "colour"])


def test_a_zip_archive_is_fetched_as_its_member_and_a_plain_file_as_it_is(tmp_path, store):
    import zipfile

    data = b"a\tred\nb\tblue\n"
    with zipfile.ZipFile(tmp_path / "delivery.zip", "w") as archive:
        archive.writestr("readme", "about the data")
        archive.writestr("data.tsv", data)
    (tmp_path / "data.tsv").write_bytes(data)
    spec = tiny_spec(source={**TSV_SOURCE, "archive_member": "data.tsv"})
    zipped = fetch_dataset(spec, f"{store}/zipped", source_uri=str(tmp_path / "delivery.zip"))
    plain = fetch_dataset(spec, f"{store}/plain", source_uri=str(tmp_path / "data.tsv"))
    assert store_for(zipped.data_uri).read_bytes(zipped.data_uri) == data and zipped.rows == plain.rows == 2
    assert zipped.source.endswith("delivery.zip!data.tsv") and zipped.sha256 == plain.sha256
    wrong = tiny_spec(source={**TSV_SOURCE, "archive_member": "nope.tsv"})
    with pytest.raises(ValueError, match=r"without 'nope.tsv' \(source.archive_member\); it holds \['readme', 'data.tsv'\]"):
        fetch_dataset(wrong, f"{store}/wrong", source_uri=str(tmp_path / "delivery.zip"))
