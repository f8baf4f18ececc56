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
