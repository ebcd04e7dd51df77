"""Table schemas and CSV encoding: exact round trips, strict schemas, errors that name line and column."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore import tables
from qstore.errors import QStoreError, RemoteError
from qstore.tables import (
    CellError,
    Column,
    CSVError,
    EncodedTable,
    Schema,
    SchemaError,
    encode_csv,
    id_hash,
    join_schema,
    union_schema,
)

EXAMPLE = """
[table]
min_group_size = 10          # output privacy
[columns]
age    = { type = "integer", min = 0, max = 150 }
sex    = { type = "categorical", values = ["M", "F"] }
height = { type = "fixed", decimals = 1, min = 0, max = 300 }
weight = { type = "fixed", decimals = 1, min = 0, max = 500 }
"""

HEADER = "age,sex,height,weight"


@pytest.fixture
def schema() -> Schema:
    return Schema.from_toml(EXAMPLE)


# ------------------------------------------------------------------ schema


def test_example_schema(schema):
    assert schema.min_group_size == 10
    assert [c.name for c in schema.columns] == ["age", "sex", "height", "weight"]
    age, sex, height, weight = schema.columns
    assert (age.lo, age.hi, age.bits, age.scale) == (0, 150, 8, 1)
    assert (sex.lo, sex.hi, sex.bits) == (0, 1, 1)
    assert (height.lo, height.hi, height.bits, height.scale) == (0, 3000, 12, 10)
    assert (weight.lo, weight.hi, weight.bits) == (0, 5000, 13)
    assert height.min == Decimal("0.0") and str(height.max) == "300.0"
    assert sex.stored_names() == ["sex", "sex=M", "sex=F"]
    assert schema.stored_columns() == ["age", "sex", "sex=M", "sex=F", "height", "weight"]
    assert schema.column("weight") is weight
    with pytest.raises(SchemaError, match="no column 'bmi'"):
        schema.column("bmi")


def test_other_types():
    s = Schema.from_toml(
        '[columns]\npid = { type = "id" }\nsmoker = { type = "boolean" }\n'
        't = { type = "integer", min = -5, max = -5 }\n'
        'x = { type = "fixed", decimals = 2, min = "-1.5", max = 2.25 }'
    )
    assert s.min_group_size == 10
    pid, smoker, t, x = s.columns
    assert (pid.lo, pid.hi, pid.bits) == (None, None, 120)
    assert (smoker.lo, smoker.hi, smoker.bits) == (0, 1, 1)
    assert (t.lo, t.hi, t.bits) == (-5, -5, 0)
    assert (x.lo, x.hi, x.min, x.max) == (-150, 225, Decimal("-1.50"), Decimal("2.25"))
    assert pid.stored_names() == ["pid"]


def test_schema_json_is_plain_json(schema):
    obj = schema.to_json()
    assert json.loads(json.dumps(obj)) == obj
    height = {"name": "height", "type": "fixed", "decimals": 1, "min": "0.0", "max": "300.0"}
    assert obj["columns"][2] == height
    assert Schema.from_json(json.loads(json.dumps(obj))) == schema


def test_same_shape_ignores_min_group_size(schema):
    other = Schema.from_toml(EXAMPLE.replace("min_group_size = 10", "min_group_size = 3"))
    assert schema.same_shape(other) and schema != other
    u = union_schema([schema, other])
    assert u.min_group_size == 10 and u.columns == schema.columns
    fewer = Schema(columns=schema.columns[:3])
    assert not schema.same_shape(fewer)
    with pytest.raises(SchemaError, match="table 2"):
        union_schema([schema, fewer])
    with pytest.raises(SchemaError):
        union_schema([])


def test_join_schema():
    left = Schema.from_toml('[columns]\nid = { type = "id" }\nage = { type = "integer", min = 0, max = 9 }')
    right = Schema.from_toml(
        '[table]\nmin_group_size = 20\n[columns]\nid = { type = "id" }\nx = { type = "boolean" }'
    )
    j = join_schema(left, right, "id")
    assert [c.name for c in j.columns] == ["id", "age", "x"] and j.min_group_size == 20
    with pytest.raises(SchemaError, match="type id"):
        join_schema(left, right, "age")
    with pytest.raises(SchemaError, match="'age' is in both"):
        join_schema(left, left, "id")
    with pytest.raises(SchemaError, match="no column"):
        join_schema(left, right, "nope")


BAD_TOML = [
    ("[columns]\nage = { type = 'integer', min = 0 }", "needs 'max'"),
    ("[columns]\nage = { type = 'integer', min = 0, max = 1, decimals = 1 }", "'decimals' does not apply"),
    ("[columns]\nage = { type = 'integer', min = 0.5, max = 1 }", "min must be an integer"),
    ("[columns]\nage = { type = 'integer', min = 0, max = 9223372036854775808 }", r"2\^63"),
    ("[columns]\nage = { type = 'integer', min = 5, max = 1 }", "min must not exceed max"),
    ("[columns]\nage = { type = 'integer', min = true, max = 1 }", "min must be an integer"),
    ("[columns]\nage = { type = 'int', min = 0, max = 1 }", "type must be one of"),
    ("[columns]\nage = { min = 0, max = 1 }", "needs a type"),
    ("[columns]\nage = { type = 'integer', min = 0, max = 1, unit = 'y' }", "unknown key 'unit'"),
    ("[columns]\nage = 3", "expected a table"),
    ("[columns]\n'2age' = { type = 'boolean' }", "must match"),
    ("[columns]\n'a-b' = { type = 'boolean' }", "must match"),
    ("[columns]\nh = { type = 'fixed', min = 0, max = 1 }", "needs 'decimals'"),
    ("[columns]\nh = { type = 'fixed', decimals = 13, min = 0, max = 1 }", "decimals must be"),
    ("[columns]\nh = { type = 'fixed', decimals = -1, min = 0, max = 1 }", "decimals must be"),
    ("[columns]\nh = { type = 'fixed', decimals = 1, min = 0.05, max = 1 }", "more than 1 decimals"),
    ("[columns]\nh = { type = 'fixed', decimals = 1, min = 'x', max = 1 }", "not a decimal"),
    ("[columns]\nh = { type = 'fixed', decimals = 1, min = nan, max = 1 }", "finite"),
    ("[columns]\nh = { type = 'fixed', decimals = 12, min = 0, max = 1e8 }", r"2\^63"),
    ("[columns]\nh = { type = 'fixed', decimals = 1, min = 0, max = 1e400 }", "too many digits"),
    ("[columns]\nc = { type = 'categorical' }", "needs 'values'"),
    ("[columns]\nc = { type = 'categorical', values = [] }", "needs 'values'"),
    ("[columns]\nc = { type = 'categorical', values = ['a', 'a'] }", "distinct"),
    ("[columns]\nc = { type = 'categorical', values = ['a=b'] }", "must not contain '='"),
    ("[columns]\nc = { type = 'categorical', values = [\"a\\tb\"] }", "control"),
    ("[columns]\nc = { type = 'categorical', values = [' a'] }", "whitespace"),
    ("[columns]\nc = { type = 'categorical', values = [''] }", "1 to 64"),
    ("[columns]\nc = { type = 'categorical', values = ['" + "x" * 65 + "'] }", "1 to 64"),
    ("[columns]\nc = { type = 'categorical', values = [1, 2] }", "must be a string"),
    ("[columns]\nc = { type = 'categorical', values = 'ab' }", "list of strings"),
    ("[columns]\nc = { type = 'boolean', values = ['a'] }", "'values' does not apply"),
    ("[columns]\nc = { type = 'id', min = 0 }", "'min' does not apply"),
    ("[table]\nmin_group_size = 0\n[columns]\nc = { type = 'id' }", "min_group_size"),
    ("[table]\nmin_group_size = 2.5\n[columns]\nc = { type = 'id' }", "min_group_size"),
    ("[table]\nmin_group = 2\n[columns]\nc = { type = 'id' }", "unknown key 'min_group'"),
    ("table = 3\n[columns]\nc = { type = 'id' }", r"\[table\] must be a table"),
    ("[tabel]\n[columns]\nc = { type = 'id' }", "unknown section 'tabel'"),
    ("[table]\nmin_group_size = 3", r"needs a \[columns\]"),
    ("[columns]\n", r"needs a \[columns\]"),
    ("[columns\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TOML)
def test_bad_toml(text, message):
    with pytest.raises(SchemaError, match=message) as info:
        Schema.from_toml(text)
    assert info.value.status == 400 and isinstance(info.value, RemoteError)


def test_schema_limits():
    many = "[columns]\n" + "".join(f"c{i} = {{ type = 'boolean' }}\n" for i in range(257))
    with pytest.raises(SchemaError, match="at most 256"):
        Schema.from_toml(many)
    assert len(Schema.from_toml(many.replace("c256 = { type = 'boolean' }\n", "")).columns) == 256
    values = [f"v{i}" for i in range(257)]
    with pytest.raises(SchemaError, match="1 to 256 values"):
        Column(name="c", type="categorical", values=tuple(values))
    assert Column(name="c", type="categorical", values=values[:256]).hi == 255
    assert Column(name="x" * 63, type="boolean")
    with pytest.raises(SchemaError):
        Column(name="x" * 64, type="boolean")
    c = Column(name="i", type="integer", min=-(2**63), max=2**63 - 1)
    assert c.bits == 64


def test_constructor_normalises_and_checks():
    c = Column(name="h", type="fixed", decimals=2, min=0, max=Decimal("1.5"))
    assert (c.min, c.max) == (Decimal("0.00"), Decimal("1.50")) and str(c.max) == "1.50"
    assert Column(name="c", type="categorical", values=["a", "b"]).values == ("a", "b")
    with pytest.raises(SchemaError, match="declared twice"):
        Schema(columns=(Column(name="a", type="id"), Column(name="a", type="boolean")))
    with pytest.raises(SchemaError, match="1 to 256 columns"):
        Schema(columns=())
    with pytest.raises(SchemaError, match="sequence of Column"):
        Schema(columns=("a",))
    with pytest.raises(SchemaError):
        Schema(columns=(Column(name="a", type="id"),), min_group_size=True)
    with pytest.raises(TypeError):
        Column("a", "id")  # keyword-only


BAD_JSON = [
    ([], "JSON object"),
    ({"columns": [{"name": "a", "type": "id"}]}, "min_group_size is missing"),
    ({"min_group_size": 1, "columns": [], "x": 1}, "unknown schema key 'x'"),
    ({"min_group_size": 1, "columns": []}, "1 to 256"),
    ({"min_group_size": 1, "columns": {"a": {"type": "id"}}}, "1 to 256"),
    ({"min_group_size": 1, "columns": [{"type": "id"}]}, "with a name"),
    ({"min_group_size": 1, "columns": ["a"]}, "with a name"),
    ({"min_group_size": 1, "columns": [{"name": 5, "type": "id"}]}, "must match"),
    ({"min_group_size": 1, "columns": [{"name": "h", "type": "fixed", "decimals": 1, "min": 0.5, "max": 1}]},
     "not a float"),
    ({"min_group_size": 1, "columns": [{"name": "h", "type": "fixed", "decimals": "1", "min": 0, "max": 1}]},
     "decimals must be"),
    ({"min_group_size": 1, "columns": [{"name": "h", "type": "integer", "min": "0", "max": 1}]},
     "min must be an integer"),
    ({"min_group_size": "1", "columns": [{"name": "a", "type": "id"}]}, "min_group_size"),
]


@pytest.mark.parametrize(("obj", "message"), BAD_JSON)
def test_bad_json(obj, message):
    with pytest.raises(SchemaError, match=message):
        Schema.from_json(obj)


# ------------------------------------------------------------------ hypothesis strategies

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
category = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="="), min_size=1, max_size=12
).filter(lambda v: v == v.strip() and len(v) <= 64)


@st.composite
def columns(draw: st.DrawFn, name: str | None = None) -> Column:
    name = name or draw(names)
    kind = draw(st.sampled_from(tables.TYPES))
    if kind == "integer":
        a, b = sorted(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2)))
        return Column(name=name, type=kind, min=a, max=b)
    if kind == "fixed":
        d = draw(st.integers(0, 12))
        lim = (2**63 - 1) // 10**d
        a, b = sorted(draw(st.lists(st.integers(-lim, lim), min_size=2, max_size=2)))
        return Column(name=name, type=kind, decimals=d, min=Decimal(a).scaleb(-d), max=Decimal(b).scaleb(-d))
    if kind == "categorical":
        return Column(name=name, type=kind, values=tuple(draw(st.lists(category, min_size=1, max_size=6,
                                                                       unique=True))))
    return Column(name=name, type=kind)


@st.composite
def schemas(draw: st.DrawFn) -> Schema:
    ns = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    return Schema(columns=tuple(draw(columns(n)) for n in ns), min_group_size=draw(st.integers(1, 10**7)))


@given(schemas())
def test_schema_json_round_trip(s):
    obj = json.loads(json.dumps(s.to_json()))
    back = Schema.from_json(obj)
    assert back == s and back.to_json() == s.to_json() and back.stored_columns() == s.stored_columns()


@given(columns(), st.data())
def test_encode_decode_round_trip(col, data):
    if col.type == "id":
        text = data.draw(st.text(max_size=20).filter(lambda t: t.strip()))
        assert col.encode(text) == id_hash(text.strip()) == col.decode(col.encode(text))
        assert 0 <= col.encode(text) < 2**120
        return
    v = data.draw(st.integers(col.lo, col.hi))
    value = col.decode(v)
    text = col.format(v)
    assert text == (str(value).lower() if col.type == "boolean" else format(value, "f") if col.type == "fixed"
                    else str(value))
    assert col.encode(text) == v
    assert col.encode(f"  {text}\t") == v
    assert col.decode(col.encode(text)) == value
    assert type(value) is {"integer": int, "fixed": Decimal, "boolean": bool, "categorical": str}[col.type]
    if col.type == "fixed":
        assert value.as_tuple().exponent == -col.decimals
        assert col.encode(text + ("0" if "." in text else ".000")) == v  # trailing zeros are exact
    with pytest.raises(CellError):
        col.decode(col.hi + 1)


def test_encode_forms():
    i = Column(name="i", type="integer", min=-10, max=10)
    assert [i.encode(t) for t in ["+7", "-7", "007", "3.", "3.00", " 4 "]] == [7, -7, 7, 3, 3, 4]
    f = Column(name="f", type="fixed", decimals=2, min=-10, max=10)
    assert [f.encode(t) for t in ["1", "1.5", "-1.25", ".5", "-.5", "5.", "+0.10", "1.2500"]] == [
        100, 150, -125, 50, -50, 500, 10, 125]
    assert f.decode(-125) == Decimal("-1.25") and str(f.decode(5)) == "0.05"
    b = Column(name="b", type="boolean")
    assert [b.encode(t) for t in ["TRUE", "False", "yes", "NO", "1", "0", "Yes"]] == [1, 0, 1, 0, 1, 0, 1]
    assert b.decode(1) is True and b.decode(0) is False
    c = Column(name="c", type="categorical", values=("M", "F"))
    assert (c.encode("F"), c.decode(0)) == (1, "M")
    d = Column(name="d", type="fixed", decimals=0, min=0, max=10)
    assert d.encode("3") == 3 and d.decode(3) == Decimal(3)
    assert d.encode("3.0") == 3


CELL_ERRORS = [
    (dict(type="integer", min=0, max=150), "", "empty cell"),
    (dict(type="integer", min=0, max=150), "   ", "empty cell"),
    (dict(type="integer", min=0, max=150), "1.5", "not an integer"),
    (dict(type="integer", min=0, max=150), "1e2", "not an integer"),
    (dict(type="integer", min=0, max=150), "1_0", "not an integer"),
    (dict(type="integer", min=0, max=150), "١٢", "not an integer"),  # int() would take these digits
    (dict(type="integer", min=0, max=150), "9" * 65, "not an integer"),
    (dict(type="integer", min=0, max=150), "151", "above the maximum 150"),
    (dict(type="integer", min=0, max=150), "-1", "below the minimum 0"),
    (dict(type="fixed", decimals=1, min=0, max=300), "1.25", "more than 1 decimal$"),
    (dict(type="fixed", decimals=2, min=0, max=300), "1.255", "more than 2 decimals"),
    (dict(type="fixed", decimals=0, min=0, max=300), "1.5", "more than 0 decimals"),
    (dict(type="fixed", decimals=1, min=0, max=300), "abc", "not a number"),
    (dict(type="fixed", decimals=1, min=0, max=300), ".", "not a number"),
    (dict(type="fixed", decimals=1, min=0, max=300), "1e3", "not a number"),
    (dict(type="fixed", decimals=1, min=0, max=300), "nan", "not a number"),
    (dict(type="fixed", decimals=1, min=0, max=300), "300.1", "above the maximum 300.0"),
    (dict(type="fixed", decimals=1, min=0, max=300), "-0.1", "below the minimum 0.0"),
    (dict(type="boolean"), "maybe", "not a boolean"),
    (dict(type="boolean"), "2", "not a boolean"),
    (dict(type="categorical", values=("M", "F")), "m", r"not one of the declared values \(M, F\)"),
    (dict(type="categorical", values=tuple(f"v{i}" for i in range(20))), "x", r"v7, … \(20 values\)"),
    (dict(type="id"), " ", "empty cell"),
]


@pytest.mark.parametrize(("spec", "text", "reason"), CELL_ERRORS)
def test_cell_errors(spec, text, reason):
    col = Column(name="c", **spec)
    with pytest.raises(CellError, match=reason) as info:
        col.encode(text)
    if text.strip():
        assert text.strip() not in str(info.value)  # the cell's content never appears
    # the same reason, with line and column, from a whole CSV
    with pytest.raises(CSVError, match=f"^line 3, column 'c': .*{reason}") as info:
        encode_csv(f"c\n{_valid(col)}\n\"{text}\"\n", Schema(columns=(col,)))
    assert (info.value.line, info.value.column) == (3, "c")


def _valid(col: Column) -> str:
    first = col.values[0] if col.values else ""
    return {"integer": "1", "fixed": "1.0", "boolean": "yes", "categorical": first, "id": "x"}[col.type]


def test_id_hash():
    assert id_hash("p1") == int(hashlib.sha256(b"p1").hexdigest()[:30], 16)
    assert id_hash("é") == int.from_bytes(hashlib.sha256("é".encode()).digest()[:15], "big")
    assert Column(name="p", type="id").encode(" p1 ") == id_hash("p1")


# ------------------------------------------------------------------ CSV


def test_encode_csv_example(schema):
    text = "sex,age,height,weight\nM,30,180.5,80\n F , 41 ,170,70.20\n\nF,0,0,500.0\n"
    t = encode_csv(text, schema)
    assert isinstance(t, EncodedTable) and t.rows == 3
    assert list(t.columns) == schema.stored_columns()
    expect = {"age": [30, 41, 0], "sex": [0, 1, 1], "sex=M": [1, 0, 0], "sex=F": [0, 1, 1],
              "height": [1805, 1700, 0], "weight": [800, 702, 5000]}
    for name, values in expect.items():
        assert t.columns[name].dtype == np.int64 and t.columns[name].tolist() == values


def test_encode_csv_inputs(schema):
    text = HEADER + "\n1,M,1,1\r\n2,F,2,2\r\n"
    want = encode_csv(text, schema).columns
    for source in [text.encode(), "\ufeff" + text, ("\ufeff" + text).encode(), io.StringIO(text),
                   io.BytesIO(text.encode("utf-8-sig"))]:
        got = encode_csv(source, schema)
        assert got.rows == 2 and all(np.array_equal(got.columns[k], want[k]) for k in want)


def test_encode_csv_ids():
    s = Schema(columns=(Column(name="pid", type="id"), Column(name="b", type="boolean")))
    t = encode_csv("pid,b\nalice,1\nbob,0\n", s)
    assert t.columns["pid"].dtype == object
    assert t.columns["pid"].tolist() == [id_hash("alice"), id_hash("bob")]
    assert t.columns["b"].dtype == np.int64


CSV_ERRORS = [
    ("", 1, None, "no header row"),
    ("\n\n", 1, None, "no header row"),
    ("age,sex,height\n", 1, "weight", "is missing from the header"),
    ("age,sex,height,weight,bmi\n", 1, "bmi", "is not a column of the schema"),
    ("Age,sex,height,weight\n", 1, "Age", r"did you mean 'age'\?"),
    ("age,sex,age,weight\n", 1, "age", "appears twice"),
    ("age,,height,weight\n", 1, None, "header field 2 is empty"),
    (HEADER + "\n", 2, None, "no data rows"),
    (HEADER + "\n1,M,1,1\n1,M,1\n", 3, None, "has 3 fields, the header has 4"),
    (HEADER + "\n1,M,1,1\n1,M,1,1,1\n", 3, None, "has 5 fields"),
    (HEADER + "\n1,M,1,1\n\n1,X,1,1\n", 4, "sex", "not one of the declared values"),
    (HEADER + '\n1,"M\nF",1,1\n', 2, "sex", "not one of the declared values"),
    (HEADER + '\n1,"M",1,1\n"2\n",M,1,1\n1,M,1,x\n', 5, "weight", "not a number"),
    (HEADER + "\n1,M,1,1\n1,M,1,1.25\n", 3, "weight", "more than 1 decimal"),
    (HEADER + "\nx,M,1,1\n", 2, "age", "not an integer"),
    (HEADER + "\n1,M,1,\n", 2, "weight", "empty cell"),
    (HEADER + "\n1,M,1,1\n1,M,1,1\n151,M,1,500.1\n", 4, "age", "above the maximum"),  # first column first
    (HEADER + '\n1,M,"1"x,1\n', 2, None, "malformed CSV"),
    (HEADER + '\n1,M,1,"1\n', 2, None, "malformed CSV"),
]


@pytest.mark.parametrize(("text", "line", "column", "reason"), CSV_ERRORS)
def test_csv_errors(schema, text, line, column, reason):
    with pytest.raises(CSVError, match=reason) as info:
        encode_csv(text, schema)
    e = info.value
    assert (e.line, e.column) == (line, column)
    assert str(e).startswith(f"line {line}" + (f", column {column!r}" if column else ""))
    assert e.status == 400 and isinstance(e, RemoteError)


def test_csv_first_bad_line_wins_across_columns_and_chunks(schema, monkeypatch):
    monkeypatch.setattr(tables, "_CHUNK_ROWS", 4)
    rows = ["1,M,1,1"] * 20
    rows[13] = "1,M,1,x"  # line 15
    rows[17] = "x,M,1,1"  # line 19
    with pytest.raises(CSVError, match="line 15, column 'weight'"):
        encode_csv(HEADER + "\n" + "\n".join(rows), schema)
    rows[13] = "1,M,1,1"
    with pytest.raises(CSVError, match="line 19, column 'age'"):
        encode_csv(HEADER + "\n" + "\n".join(rows), schema)
    rows[17] = "1,M,1,1"
    assert encode_csv(HEADER + "\n" + "\n".join(rows), schema).rows == 20


def test_csv_not_utf8(schema):
    with pytest.raises(CSVError, match=r"^line 3: not UTF-8"):
        encode_csv((HEADER + "\n1,M,1,1\n1,\xff,1,1\n").encode("latin-1"), schema)


def test_csv_size_limits(schema, monkeypatch):
    monkeypatch.setattr(tables, "MAX_ROWS", 3)
    assert encode_csv(HEADER + "\n1,M,1,1\n" * 3, schema).rows == 3
    with pytest.raises(CSVError, match=r"^line 5: too many rows: at most 3"):
        encode_csv(HEADER + "\n" + "1,M,1,1\n" * 4, schema)
    monkeypatch.setattr(tables, "MAX_ROWS", 100)
    monkeypatch.setattr(tables, "MAX_CELLS", 12)  # 6 stored columns: at most 2 rows
    with pytest.raises(CSVError, match=r"^line 4: too many rows: at most 2"):
        encode_csv(HEADER + "\n" + "1,M,1,1\n" * 3, schema)
    with pytest.raises(CSVError, match="longer than"):
        encode_csv(HEADER + "\n1,M,1," + "1" * 200_000 + "\n", schema)


@st.composite
def cell_text(draw: st.DrawFn, col: Column) -> str:
    """A valid cell in one of the spellings people write, or sometimes an invalid one."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", "x", "1.2.3", "-", "+", " ", "1e5", "١", "--1", "0x10"]))
    pad = draw(st.sampled_from(["", "", "", " ", "\t"]))
    if col.type == "id":
        return draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
    e = draw(st.integers(col.lo, col.hi))
    v = col.decode(e)
    if col.type == "boolean":
        spellings = ["true", "TRUE", "yes", "Yes", "1"] if v else ["false", "No", "0", "FALSE"]
        text = draw(st.sampled_from(spellings))
    elif col.type == "fixed":
        text = col.format(e) + draw(st.sampled_from(["", "", "0"]) if col.decimals else st.just(""))
        if draw(st.booleans()) and not text.startswith("-"):
            text = "+" + text
    elif col.type == "integer":
        text = str(v) + draw(st.sampled_from(["", "", ".0"]))
    else:
        text = str(v)
    return pad + text + pad


@given(schemas(), st.data())
def test_encode_csv_matches_cell_reference(s, data):
    """The chunked, vectorised CSV path equals Column.encode per cell, errors included."""
    n = data.draw(st.integers(1, 12))
    order = data.draw(st.permutations(list(s.columns)))
    rows = [[data.draw(cell_text(c)) for c in order] for _ in range(n)]
    out = io.StringIO()
    w = csv.writer(out)  # quotes a lone empty field, so no row becomes a blank line
    w.writerow([c.name for c in order])
    w.writerows(rows)
    text = out.getvalue()
    expect: dict[str, list[int]] = {c.name: [] for c in s.columns}
    first_bad = None
    for i, row in enumerate(rows):
        for c, cell in zip(order, row):
            try:
                expect[c.name].append(c.encode(cell))
            except CellError as e:
                first_bad = first_bad or (c.name, e.reason, i)
    if first_bad is not None:
        with pytest.raises(CSVError) as info:
            encode_csv(text, s)
        assert info.value.column == first_bad[0] and info.value.reason == first_bad[1]
        return
    t = encode_csv(text, s)
    assert t.rows == n
    for c in s.columns:
        assert t.columns[c.name].tolist() == expect[c.name]
        for j, v in enumerate(c.values):
            assert t.columns[f"{c.name}={v}"].tolist() == [int(x == j) for x in expect[c.name]]


@given(st.text(max_size=300))
def test_csv_garbage_raises_only_csv_errors(text):
    s = Schema.from_toml(EXAMPLE)
    try:
        encode_csv(text, s)
    except CSVError as e:
        assert isinstance(e, QStoreError) and e.line >= 1
    try:
        encode_csv(HEADER + "\n" + text, s)
    except CSVError as e:
        assert e.line >= 2 or e.column is None
