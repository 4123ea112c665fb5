"""benchmarks/rwkv_cpp.py's own logic, without rwkv.cpp: finding a built library, the format list, the ratio
notes, and the one-line advice (no rows) when no checkout is there. rwkv.cpp itself is never needed here."""

from __future__ import annotations

import torch

from benchmarks import rwkv_cpp
from benchmarks.bench import Row


def test_library_found_where_its_cmake_build_leaves_it(tmp_path):
    assert rwkv_cpp.library_path(tmp_path, "linux") is None
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "librwkv.so").write_bytes(b"")
    assert rwkv_cpp.library_path(tmp_path, "linux") == tmp_path / "build" / "librwkv.so"
    (tmp_path / "build" / "bin" / "librwkv.so").write_bytes(b"")  # the wrapper's own order: bin first
    assert rwkv_cpp.library_path(tmp_path, "linux") == tmp_path / "build" / "bin" / "librwkv.so"
    assert rwkv_cpp.library_path(tmp_path, "darwin") is None


def test_formats(monkeypatch):
    monkeypatch.delenv("RWKV_CPP_FORMATS", raising=False)
    assert rwkv_cpp.formats() == ["FP32", "FP16", "Q8_0", "Q5_1"]
    assert rwkv_cpp.formats(" q8_0, fp16 ,") == ["Q8_0", "FP16"]
    monkeypatch.setenv("RWKV_CPP_FORMATS", "Q5_1")
    assert rwkv_cpp.formats() == ["Q5_1"]


def test_ours_rows_get_the_ratio_to_the_fastest_format_of_each_phase():
    rows = [Row("ours", "bf16", 600.0, 80.0, note="x"), Row("ours", "int8", 300.0, 120.0),
            Row("rwkv pip", "fp32", 400.0, 20.0), Row("rwkv.cpp", "FP16", 200.0, 60.0),
            Row("rwkv.cpp", "Q8_0", 150.0, 40.0), Row("rwkv.cpp", "Q5_1")]  # a failed row: no numbers
    rwkv_cpp.annotate(rows)
    assert rows[0].note == "x; × rwkv.cpp best (FP16 / FP16): 3.00 / 1.33"
    assert rows[1].note == "× rwkv.cpp best (FP16 / FP16): 1.50 / 2.00"
    assert [r.note for r in rows[2:]] == ["", "", "", ""]
    lone = [Row("ours", "bf16", 1.0, 1.0)]
    rwkv_cpp.annotate(lone)  # no rwkv.cpp rows: nothing added
    assert lone[0].note == ""


def test_missing_checkout_gives_no_rows_and_says_how_to_get_it(tmp_path, capsys):
    assert rwkv_cpp.factories({"emb.weight": torch.zeros(2, 2)}, 2, str(tmp_path / "none")) == []
    err = capsys.readouterr().err
    assert "git clone --recursive https://github.com/RWKV/rwkv.cpp" in err and "RWKV_CPP_DIR" in err
    assert err.count("\n") == 1


def test_prefill_chunks_only_for_rwkv4_unless_set():
    v4, v5 = {"blocks.0.att.time_first": None}, {"blocks.0.att.ln_x.weight": None}
    assert (rwkv_cpp.prefill_chunk(v4, ""), rwkv_cpp.prefill_chunk(v5, "")) == (16, 0)
    assert (rwkv_cpp.prefill_chunk(v4, "0"), rwkv_cpp.prefill_chunk(v5, "32")) == (0, 32)
