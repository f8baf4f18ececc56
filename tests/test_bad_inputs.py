"""The corpus of bad input (tests/bad_inputs): every case gets its outcome, and the README shows them all.

Each step runs as its operator runs it (``failing_fast``, the operator's spec reading), so
a failure is the ``AirflowFailException`` that Airflow does not retry; its cause must be
the expected error, raised in tfjobs (not deep inside pandas or the csv module), with the
expected text. A step that fails leaves no output marked complete.
"""

import traceback
from pathlib import Path

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException

from bad_inputs import CASES, CORPUS, PARTITION, README, Fails, Works, readme_section, readme_table
from conftest import ROOT, loopback_http, tiny_spec
from operators.base import ShardlineOperator
from s3_server import moto_s3
from tfjobs.allowed_sources import AllowedSources
from tfjobs.fetch import fetch_dataset
from tfjobs.storage import s3
from tfjobs.storage.store import read_json, store_for
from tfjobs.validate import validate_dataset


@pytest.fixture(scope="module")
def http_server():
    with loopback_http() as server:
        yield server


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        s3.configure(lambda: endpoint.client(), source="the test endpoint")
        yield endpoint
        s3.configure()


def run_step(operator, step, *args, **kwargs):
    """``step(*args)`` as the operator runs it: its result, or the error behind the AirflowFailException."""
    try:
        with operator.failing_fast():
            return step(*args, **kwargs), None
    except AirflowFailException as failure:
        return None, failure.__cause__ or failure.__context__


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_its_outcome(case, tmp_path, request):
    places = {"{tmp}": str(tmp_path), "{raw}": str(tmp_path / "store" / "raw"),
              "{validated}": str(tmp_path / "store" / "validated")}
    if "{http}" in case.source:
        places["{http}"] = request.getfixturevalue("http_server").url("")
    if case.source.startswith("s3://"):
        request.getfixturevalue("s3_endpoint")
    folder = tmp_path if case.make else CORPUS
    if case.make:
        case.make(tmp_path / case.input)
    source = fill_in(case.source, places) if case.source else str(folder / case.input)
    places["{source}"] = places["{spec}"] = source
    operator = ShardlineOperator(task_id="bad_input", spec=source)  # reads the spec cases; the rest use failing_fast

    if case.step == "spec":
        _, error = run_step(operator, operator.load_spec)
        check_failure(case.outcome, error, places)
        return
    spec = tiny_spec()
    allowed = AllowedSources((str(CORPUS), str(tmp_path), places.get("{http}", ""), "s3://"), "the corpus's prefixes")
    fetched, error = run_step(operator, fetch_dataset, spec, places["{raw}"], PARTITION, source, allowed=allowed)
    if case.step == "fetch":
        check_failure(case.outcome, error, places)
        assert not store_for(places["{raw}"]).exists(places["{raw}"] + "/manifest.json")
        return
    assert error is None, f"the fetch failed: {error}"
    validated, error = run_step(operator, validate_dataset, spec, places["{raw}"], places["{validated}"])
    if isinstance(case.outcome, Fails):
        check_failure(case.outcome, error, places)
        assert not Path(places["{validated}"], "report.json").exists()
        return
    assert error is None, f"the validation failed: {error}"
    # No row is dropped: what the fetch counted is what validate read, and each row is valid or quarantined.
    assert fetched.rows == validated.rows_in == validated.rows_valid + validated.rows_quarantined
    assert len(pd.read_parquet(validated.data_uri)) == validated.rows_valid
    # surrogateescape: a value whose bytes did not decode is written back to the quarantine as delivered.
    quarantine = pd.read_csv(validated.quarantine_uri, keep_default_na=False, encoding_errors="surrogateescape",
                             dtype=object)
    if isinstance(case.outcome, Works):
        assert (validated.rows_valid, validated.rows_quarantined) == (case.outcome.rows, 0)
        assert read_json(validated.report_uri)["ignored_columns"] == list(case.outcome.ignored_columns)
    else:
        assert validated.rows_valid == case.outcome.valid
        assert dict(zip(quarantine["_line"].astype(int), quarantine["_reason"])) == case.outcome.lines
    assert len(quarantine) == validated.rows_quarantined


def check_failure(outcome, error, places):
    assert isinstance(outcome, Fails), f"expected {outcome}, got {error!r}"
    assert error is not None, f"expected {outcome.error.__name__}, but the step succeeded"
    assert isinstance(error, outcome.error), f"expected {outcome.error.__name__}, got {error!r}"
    for text in outcome.says:
        assert fill_in(text, places) in str(error)
    raised_in = Path(traceback.extract_tb(error.__traceback__)[-1].filename)
    assert raised_in.is_relative_to(ROOT / "tfjobs"), f"raised in {raised_in}, not by tfjobs"


def fill_in(text, places):
    for placeholder, value in places.items():
        text = text.replace(placeholder, value)
    return text


def test_the_corpus_covers_the_issue_and_every_file_in_it():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    used = {case.input for case in CASES if case.input and not case.make}
    assert used == {p.name for p in CORPUS.iterdir() if p.suffix in (".csv", ".yaml")}


def test_the_readme_table_is_generated_from_the_corpus():
    assert readme_section(README.read_text()) == readme_table(), (
        "README.md's table of bad inputs is not current: run `python -m tests.bad_inputs`")
