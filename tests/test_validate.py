import pandas as pd
import pytest

from conftest import tiny_spec
from tfjobs.fetch import fetch_dataset
from tfjobs.validate import MissingColumnError, TooManyQuarantinedError, validate_dataset


def validate_csv(tmp_path, text, spec=None):
    spec = spec or tiny_spec()
    (tmp_path / "in.csv").write_text(text)
    store = str(tmp_path / "store")
    fetch_dataset(spec, f"{store}/raw", source_uri=str(tmp_path / "in.csv"))
    return validate_dataset(spec, f"{store}/raw", f"{store}/validated")


def test_valid_rows_are_typed_and_missing_values_kept(tmp_path):
    result = validate_csv(tmp_path, "size,colour,batch,kind,extra\n1.5,red,3,a,x\n,NA,,b,y\n")
    frame = pd.read_parquet(result.data_uri)
    assert result.rows_valid == 2 and result.rows_quarantined == 0
    assert frame["size"].dtype == "float32" and frame["size"].isna().tolist() == [False, True]
    assert frame["colour"].tolist() == ["red", ""]
    assert frame["batch"].tolist() == [3, -1]


def test_missing_label_column_fails_naming_it(tmp_path):
    with pytest.raises(MissingColumnError, match=r"'kind' \(the label\) missing"):
        validate_csv(tmp_path, "size,colour,batch\n1,red,3\n")


def test_missing_feature_columns_are_all_named(tmp_path):
    with pytest.raises(MissingColumnError, match=r"'size' \(a numeric feature\), 'batch' \(a integer_categorical"):
        validate_csv(tmp_path, "colour,kind\nred,a\n")


def test_bad_rows_are_quarantined_with_reasons_and_counted(tmp_path):
    text = (
        "size,colour,batch,kind\n"
        "1.0,red,1,a\n"      # line 2: fine
        ",red,1,\n"          # line 3: label missing
        "abc,red,1,a\n"      # line 4: number unparseable
        "2.0,red,1.5,c\n"    # line 5: not an integer, unknown class
        "3.0,blue,2,b\n"     # line 6: fine
    )
    result = validate_csv(tmp_path, text, tiny_spec(max_quarantine_fraction=0.9))
    assert (result.rows_in, result.rows_valid, result.rows_quarantined) == (5, 2, 3)
    assert result.reasons == {
        "kind: missing label": 1,
        "size: cannot parse as a number": 1,
        "batch: is not an integer": 1,
        "kind: label is not one of the spec's classes": 1,
    }
    quarantine = pd.read_csv(result.quarantine_uri, keep_default_na=False)
    assert quarantine["_line"].tolist() == [3, 4, 5]
    assert quarantine["_reason"].tolist() == [
        "kind: missing label",
        "size: cannot parse 'abc' as a number",
        "batch: '1.5' is not an integer; kind: label 'c' is not one of the spec's classes",
    ]


def test_quarantine_policy_rejects_missing_values(tmp_path):
    spec = tiny_spec(features={"size": {"kind": "numeric", "missing": "quarantine"},
                               "colour": {"kind": "categorical"}, "batch": {"kind": "integer_categorical"}})
    result = validate_csv(tmp_path, "size,colour,batch,kind\n,red,1,a\n1,red,1,a\n2,blue,2,b\n", spec)
    assert result.reasons == {"size: missing value (policy: quarantine)": 1}


def test_too_many_quarantined_rows_fail_the_step(tmp_path):
    with pytest.raises(TooManyQuarantinedError, match=r"2 of 3 rows \(66.7%\).*quarantine.csv"):
        validate_csv(tmp_path, "size,colour,batch,kind\nx,red,1,a\ny,red,1,a\n1,red,1,a\n")


def test_revalidating_unchanged_input_rewrites_nothing(tmp_path):
    first = validate_csv(tmp_path, "size,colour,batch,kind\n1,red,1,a\n2,blue,2,b\n")
    second = validate_dataset(tiny_spec(), str(tmp_path / "store/raw"), str(tmp_path / "store/validated"))
    assert (first.rewritten, second.rewritten) == (True, False)


def test_validate_needs_fetched_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the fetch step first"):
        validate_dataset(tiny_spec(), str(tmp_path / "raw"), str(tmp_path / "validated"))


# A delivery as the SMS collection comes: tab-separated, no header, quotes and £ inside the text,
# and one message whose bytes are not UTF-8 (Latin-1 "café" from an old phone: \xe9).
TSV = (b'ham\tsee you at "the usual" place\n'
       b'spam\tWIN \xc2\xa3100 now! txt "WIN" to 80808\n'
       b'ham\tcaf\xe9 at 5?\n'
       b'eggs\tnot a label\n'
       b'ham\t  padded with spaces  \n'
       b'\n')
TSV_SOURCE = {"kind": "csv", "uri": "unused.tsv", "delimiter": "\t", "quoting": "none", "header": False,
              "column_names": ["label", "message"]}


def tsv_spec(**overrides):
    return tiny_spec(**{"source": TSV_SOURCE, "label": {"name": "label", "task": "classification",
                                                         "classes": ["ham", "spam"]},
                        "features": {"message": {"kind": "categorical"}}, "max_quarantine_fraction": 0.5,
                        **overrides})


def test_a_tab_separated_delivery_without_header_is_read_as_its_source_says(tmp_path):
    (tmp_path / "in.tsv").write_bytes(TSV)
    store = str(tmp_path / "store")
    fetched = fetch_dataset(tsv_spec(), f"{store}/raw", source_uri=str(tmp_path / "in.tsv"))
    result = validate_dataset(tsv_spec(), f"{store}/raw", f"{store}/validated")
    # Every row accounted for, as fetch counted them (the blank line is no row for either).
    assert fetched.rows == result.rows_in == result.rows_valid + result.rows_quarantined == 5
    frame = pd.read_parquet(result.data_uri)
    assert frame["message"].tolist() == ['see you at "the usual" place', 'WIN £100 now! txt "WIN" to 80808',
                                         "padded with spaces"]
    assert result.reasons == {"message: is not valid utf-8": 1, "label: label is not one of the spec's classes": 1}


def test_a_value_that_is_not_valid_in_the_encoding_quarantines_its_row_as_delivered(tmp_path):
    (tmp_path / "in.tsv").write_bytes(TSV)
    store = str(tmp_path / "store")
    fetch_dataset(tsv_spec(), f"{store}/raw", source_uri=str(tmp_path / "in.tsv"))
    result = validate_dataset(tsv_spec(), f"{store}/raw", f"{store}/validated")
    quarantine = (tmp_path / "store" / "validated" / "quarantine.csv").read_bytes()
    assert b"caf\xe9 at 5?" in quarantine  # the row's bytes as they came, for whoever fixes the source
    rows = pd.read_csv(result.quarantine_uri, keep_default_na=False, encoding="latin-1")
    assert rows["_line"].tolist() == [3, 4]  # no header: the first line is line 1
    assert rows["_reason"].tolist()[0] == r"message: 'caf\udce9 at 5?' is not valid utf-8"
    # Read as Latin-1 instead, every byte decodes: the row is valid.
    latin = tsv_spec(source={**TSV_SOURCE, "encoding": "latin-1"})
    fetch_dataset(latin, f"{store}/raw-latin", source_uri=str(tmp_path / "in.tsv"))
    result = validate_dataset(latin, f"{store}/raw-latin", f"{store}/validated-latin")
    assert "café at 5?" in pd.read_parquet(result.data_uri)["message"].tolist()


def test_quoted_fields_keep_their_delimiters_and_line_breaks_with_minimal_quoting(tmp_path):
    text = 'label;message\nham;"a; b"\nspam;"two\nlines"\n'
    spec = tsv_spec(source={"kind": "csv", "uri": "x.csv", "delimiter": ";"})
    result = validate_csv(tmp_path, text, spec)
    assert pd.read_parquet(result.data_uri)["message"].tolist() == ["a; b", "two\nlines"]
    assert result.rows_in == 2
