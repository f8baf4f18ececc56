"""What a run may fetch: the store, the spec's own source and the allowed prefixes; nothing else is read."""

import collections
import datetime
import json
import os
import re
import socket
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conftest import ROOT, loopback_http, tiny_spec
from operators import FetchDatasetOperator
from tfjobs.allowed_sources import AllowedSources, SourceNotAllowedError
from tfjobs.fetch import fetch_dataset, main

CSV = "size,colour,batch,kind\n1.5,red,3,a\n2.5,blue,4,b\n"
SETTING = "AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES"
REFUSED = "not under any allowed source prefix, so nothing was read from it"
# A landing pattern that climbs out of its prefix once {partition} is filled in.
ESCAPING_PATTERN = "{landing}/{{partition}}" + "/.." * 40 + "/etc/passwd"
OUTSIDE = ["/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", ESCAPING_PATTERN]


def fetch(tmp_path, source_uri, allowed, **kwargs):
    return fetch_dataset(tiny_spec(), str(tmp_path / "store" / "raw"), partition="2026-11-25", source_uri=source_uri,
                         allowed=AllowedSources(tuple(allowed), "--allow-source"), **kwargs)


@pytest.fixture
def landing(tmp_path):
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "2026-11-25.csv").write_text(CSV)
    (tmp_path / "secret.csv").write_text(CSV)
    return tmp_path / "landing"


@pytest.mark.parametrize("source", OUTSIDE, ids=["path", "file-uri", "link-local-http", "landing-dotdot"])
def test_sources_outside_the_prefixes_are_refused_before_a_byte_is_read(tmp_path, landing, source):
    with pytest.raises(SourceNotAllowedError, match=f"{REFUSED}.*add its prefix to --allow-source"):
        fetch(tmp_path, source.format(landing=landing), [str(landing)])
    assert not (tmp_path / "store").exists()


def test_a_landing_prefix_allows_its_own_files_only(tmp_path, landing):
    assert fetch(tmp_path, f"{landing}/{{partition}}.csv", [str(landing)]).rows == 2
    (tmp_path / "landing-old").mkdir()
    (tmp_path / "landing-old" / "2026-11-25.csv").write_text(CSV)
    for source in (f"{landing}/{{partition}}/../../secret.csv", f"{landing}-old/{{partition}}.csv",
                   f"{landing}/../secret.csv"):
        with pytest.raises(SourceNotAllowedError, match=REFUSED):
            fetch(tmp_path, source, [str(landing)])
    # A partition cannot climb out either.
    with pytest.raises(SourceNotAllowedError, match=REFUSED):
        fetch_dataset(tiny_spec(), str(tmp_path / "raw"), partition="../secret", source_uri=f"{landing}/{{partition}}.csv",
                      allowed=AllowedSources((str(landing),)))


def test_a_symbolic_link_is_followed_to_where_it_points(tmp_path, landing):
    os.symlink(tmp_path / "secret.csv", landing / "linked-out.csv")
    os.symlink(landing / "2026-11-25.csv", landing / "linked-in.csv")
    with pytest.raises(SourceNotAllowedError, match=REFUSED):
        fetch(tmp_path, str(landing / "linked-out.csv"), [str(landing)])
    assert fetch(tmp_path, str(landing / "linked-in.csv"), [str(landing)]).rows == 2
    # The prefix is resolved too: a link to the landing folder allows what is in it.
    os.symlink(landing, tmp_path / "landing-link")
    assert fetch(tmp_path, (landing / "2026-11-25.csv").as_uri(), [str(tmp_path / "landing-link")]).rows == 2


def test_the_spec_own_source_is_always_allowed(tmp_path, landing):
    spec = tiny_spec(source={"kind": "landing", "uri": str(landing)})
    result = fetch_dataset(spec, str(tmp_path / "raw"), partition="2026-11-25", allowed=AllowedSources(()))
    assert result.rows == 2
    escaping = tiny_spec(source={"kind": "landing", "uri": str(landing), "pattern": "{partition}/../../secret.csv"})
    with pytest.raises(SourceNotAllowedError, match=REFUSED):
        fetch_dataset(escaping, str(tmp_path / "raw"), partition="2026-11-25", allowed=AllowedSources(()))


@pytest.mark.parametrize("uri, allowed", [
    ("s3://landing/housing/2026-11-25.csv", True),
    ("s3://landing/housing", True),
    ("s3://landing/housing-old/2026-11-25.csv", False),
    ("s3://landing/housing/../private/x.csv", False),
    ("s3://landing/housing/%2e%2e/private/x.csv", False),
    ("s3://landing-2/housing/x.csv", False),
    ("https://data.example.com/housing/x.csv", True),
    ("https://data.example.com:443/housing/x.csv", True),
    ("https://data.example.com:8443/housing/x.csv", False),
    ("ftp://data.example.com/housing/x.csv", False),
    ("https://data.example.com.evil.example/housing/x.csv", False),
    ("https://anything.example/x.csv", False),
    ("http://anything.example/x.csv", True),
])
def test_urls_match_scheme_host_port_and_whole_path_segments(uri, allowed):
    sources = AllowedSources(("s3://landing/housing", "https://data.example.com/housing/", "http://"))
    if allowed:
        sources.check(uri)
    else:
        with pytest.raises(SourceNotAllowedError, match=REFUSED):
            sources.check(uri)


def test_private_addresses_need_a_prefix_that_names_the_host():
    sources = AllowedSources(("https://", "http://10.0.0.7:8080/", "http://localhost:8000/", "http://169.254.169.254/"))
    sources.check_address("https://data.example.com/x.csv", "93.184.215.14")
    for url, address in [("https://data.example.com/x.csv", "10.1.2.3"), ("https://data.example.com/x.csv", "::1"),
                         ("https://data.example.com/x.csv", "::ffff:127.0.0.1"),
                         ("https://data.example.com/x.csv", "169.254.169.254")]:
        with pytest.raises(SourceNotAllowedError, match=f"resolves to .*address that no allowed source prefix names"):
            sources.check_address(url, address)
    sources.check_address("http://10.0.0.7:8080/x.csv", "10.0.0.7")
    sources.check_address("http://localhost:8000/x.csv", "127.0.0.1")
    sources.check_address("http://169.254.169.254/latest/x", "169.254.169.254")
    # A name is not enough for a link-local address: the prefix must name the address itself.
    with pytest.raises(SourceNotAllowedError, match="169.254.169.254, a link-local address"):
        sources.check_address("http://localhost:8000/x.csv", "169.254.169.254")


def test_loopback_http_is_reached_only_where_a_prefix_names_it(tmp_path):
    with loopback_http() as server:
        server.files["/data.csv"] = CSV.encode()
        with pytest.raises(SourceNotAllowedError, match="127.0.0.1, a loopback address"):
            fetch(tmp_path, server.url("/data.csv"), ["http://"])
        assert server.requests == []
        assert fetch(tmp_path, server.url("/data.csv"), [server.url("/")]).rows == 2


def test_a_name_is_checked_by_the_address_it_is_connected_to(tmp_path, monkeypatch):
    """DNS rebinding: the name resolves to loopback when the socket connects, whatever it said before."""
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        return real("127.0.0.1" if host == "data.example" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with loopback_http() as server:
        server.files["/data.csv"] = CSV.encode()
        port = server.url("/").split(":")[2].rstrip("/")
        with pytest.raises(SourceNotAllowedError, match="127.0.0.1, a loopback address"):
            fetch(tmp_path, f"http://data.example:{port}/data.csv", ["http://"])
        assert server.requests == []
        # Named by its prefix, the host may be private; the connection goes to the address that was checked.
        assert fetch(tmp_path, f"http://data.example:{port}/data.csv", [f"http://data.example:{port}/"]).rows == 2


def test_redirects_stay_on_the_allowed_prefixes(tmp_path):
    with loopback_http() as a, loopback_http() as b:
        a.files["/in/data.csv"] = b.files["/data.csv"] = a.files["/out/data.csv"] = CSV.encode()
        a.redirects["/in/same"] = a.url("/in/data.csv")
        a.redirects["/in/up"] = a.url("/out/data.csv")
        a.redirects["/in/elsewhere"] = b.url("/data.csv")
        a.redirects["/in/ftp"] = "ftp://127.0.0.1/data.csv"
        assert fetch(tmp_path, a.url("/in/same"), [a.url("/in/")]).rows == 2
        for path, target in (("/in/up", a.url("/out/data.csv")), ("/in/elsewhere", b.url("/data.csv")),
                             ("/in/ftp", "ftp://127.0.0.1/data.csv")):
            with pytest.raises(SourceNotAllowedError, match=f"The source {target} is {REFUSED}"):
                fetch(tmp_path, a.url(path), [a.url("/in/")])
        assert b.requests == [] and "/out/data.csv" not in [p for _, p, _ in a.requests]
        # A late delivery is looked for (HEAD) under the same rules.
        a.redirects["/in/2026-11-25.csv"] = b.url("/2026-11-25.csv")
        with pytest.raises(SourceNotAllowedError, match=REFUSED):
            fetch(tmp_path, a.url("/in/{partition}.csv"), [a.url("/in/")])
        assert b.requests == []


def test_the_command_line_reads_under_allow_source_only(tmp_path, landing):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({"name": "tiny", "source": {"kind": "csv", "uri": str(landing / "2026-11-25.csv")},
                                "label": {"name": "kind", "task": "classification", "classes": ["a", "b"]},
                                "features": {"size": {"kind": "numeric"}}}))
    output = str(tmp_path / "out")
    with pytest.raises(SourceNotAllowedError, match="add its prefix to --allow-source"):
        main(["--spec", str(spec), "--output", output, "--source", "/etc/passwd", "--allow-source", str(tmp_path / "x")])
    main(["--spec", str(spec), "--output", output, "--allow-source", str(tmp_path / "x")])  # the spec's own source
    assert (tmp_path / "out" / "data.csv").read_text() == CSV


# -- Under Airflow: the operator's allow-list -------------------------------------------------------------------------
SPEC = ROOT / "include" / "penguins.yaml"


def run_fetch(store, source_uri, partition="2026-11-25"):
    operator = FetchDatasetOperator(task_id="fetch", spec=SPEC, store_uri=str(store), partition=partition,
                                    source_uri=source_uri)
    logical = datetime.datetime(2026, 11, 25, tzinfo=datetime.timezone.utc)
    context = {"dag_run": SimpleNamespace(logical_date=logical, run_after=logical),
               "outlet_events": collections.defaultdict(SimpleNamespace)}
    return operator.execute(context)


@pytest.mark.parametrize("source", OUTSIDE, ids=["path", "file-uri", "link-local-http", "landing-dotdot"])
def test_a_triggered_source_outside_the_allow_list_fails_the_fetch_naming_the_setting(tmp_path, landing, monkeypatch,
                                                                                      source):
    monkeypatch.setenv(SETTING, str(landing))
    with pytest.raises(AirflowFailException, match=f"{REFUSED}.*allowed_source_prefixes \\({SETTING}\\)"):
        run_fetch(tmp_path / "store", source.format(landing=landing))
    assert not (tmp_path / "store").exists()


def test_by_default_a_run_fetches_from_the_store_and_the_spec_own_source_only(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTING)
    store = tmp_path / "store"
    (store / "incoming").mkdir(parents=True)
    (tmp_path / "elsewhere.csv").write_text(CSV)
    import palmerpenguins

    palmerpenguins.load_penguins().to_csv(store / "incoming" / "penguins.csv", index=False)
    assert run_fetch(store, str(store / "incoming" / "penguins.csv"))["rows"] == 344
    assert run_fetch(store, "", partition="2026-11-24")["rows"] == 344  # palmerpenguins: nothing to allow
    with pytest.raises(AirflowFailException, match=re.escape(f"Allowed: {store}. If it is meant to be fetched")):
        run_fetch(store, str(tmp_path / "elsewhere.csv"), partition="2026-11-23")
    monkeypatch.setenv(SETTING, f"{tmp_path / 'other'}, {tmp_path}")
    assert run_fetch(store, str(tmp_path / "elsewhere.csv"), partition="2026-11-23")["rows"] == 2
