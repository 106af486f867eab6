"""Evaluation text from local files of every supported kind."""

import json

import pandas as pd
import pytest

from utils.data import load_text
from utils.errors import KitError

RECORDS = ["First paragraph of the text.", "Second one, a little longer.", "Third."]


def test_txt_file_is_used_whole(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\n\nline two\n")
    assert load_text(str(path)) == "line one\n\nline two\n"


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_table_files_join_the_text_column_with_blank_lines(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    table = pd.DataFrame({"body": RECORDS, "id": [1, 2, 3]})
    if suffix == ".csv":
        table.to_csv(path, index=False)
    elif suffix == ".json":
        path.write_text(json.dumps(table.to_dict(orient="records")))
    elif suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path)
    assert load_text(str(path), text_column="body") == "\n\n".join(RECORDS)
    with pytest.raises(KitError, match="no column 'text'.*body"):
        load_text(str(path))


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(KitError, match="unknown type"):
        load_text(str(path))
