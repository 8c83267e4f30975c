"""`samforge data check`: readable summary, JSON report, clear errors."""

from __future__ import annotations

import json

from services.cli import main
from tests.sam_core.test_diagnostics import write_speck_dataset


def test_data_check_names_specks_and_recommends_crops(tmp_path, capsys):
    root = write_speck_dataset(tmp_path / "specks")
    out = tmp_path / "reports" / "check.json"
    assert main(["data", "check", str(root), "--model", "litemedsam", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "18 (86%) below 2 px at litemedsam's 256 px input" in text
    assert "img0 #1 (id 2): 1x1 px native, 0.50 px at input" in text
    assert "recommend --crop 256:" in text and "recommend --min-area 2:" in text
    report = json.loads(out.read_text())
    assert report["n_unresolvable"] == 18 and len(report["unresolvable"]) == 18
    assert [r["flag"] for r in report["recommendations"]] == ["--crop", "--min-area"]


def test_data_check_min_area_drops_the_specks(tmp_path, capsys):
    root = write_speck_dataset(tmp_path / "specks")
    assert main(["data", "check", str(root), "--model", "vit_b", "--min-area", "2"]) == 0
    assert "15 instances, 0 (0%) below 2 px at vit_b's 1024 px input" in capsys.readouterr().out


def test_data_check_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samforge data: error:") and "no such file or directory" in err and "nope" in err
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "unrecognised data set layout" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path), "--model", "vit_q"]) == 2
    assert "unknown model 'vit_q'" in capsys.readouterr().err
