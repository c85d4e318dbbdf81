"""`levit ablate`: a tiny sweep in-process; files, table columns, numbers in range, resume."""

from __future__ import annotations

import csv
import json

from PIL import Image
from train_utils import make_dataset

import levit
from levit.cli import main
from levit.paper.ablations import COLUMNS


def _args(data, out, variants):
    return [
        "ablate",
        "--data",
        str(data),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--img-size",
        "32",
        "-b",
        "4",
        "--variants",
        variants,
        "--bench-img-size",
        "32",
        "--bench-seconds",
        "0.1",
    ]


def test_tiny_sweep_writes_the_table_and_resumes(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", classes=2, train=4, val=2)
    out = tmp_path / "sweep"
    assert main(_args(data, out, "base")) == 0
    assert (out / "base" / "ablate.json").is_file() and (out / "base" / "best.pth").is_file()

    # a started sweep is never overwritten silently
    assert main(_args(data, out, "base,A7")) == 1
    assert "--resume auto" in capsys.readouterr().err

    assert main([*_args(data, out, "base,A7"), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "base: complete, skipped" in err and "A7: training" in err

    with open(out / "ablations.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == COLUMNS
    assert [r["row"] for r in rows] == ["base", "A7"]
    for r in rows:
        assert 0.0 <= float(r["top1"]) <= 100.0
        assert float(r["cpu_img_s"]) > 0 and r["fused"] == "True"
        assert int(r["params"]) > 7_000_000  # LeViT-128S without distillation head, 1000 classes
        assert float(r["paper_top1"]) in (71.9, 71.1)
    assert rows[0]["params"] == rows[1]["params"]  # A7 drops an activation only
    md = (out / "ablations.md").read_text()
    assert "| A7 | no Hardswish before the attention projection" in md
    assert json.loads((out / "A7" / "ablate.json").read_text())["epochs"] == 1
    trained = levit.create_model("levit_128s", checkpoint=out / "A7" / "best.pth")  # the run trained A7
    assert trained.config.ablation == "A7" and not trained.config.attn_act
    with Image.open(out / "ablations.png") as im:
        assert im.format == "PNG"


def test_bad_flags(tmp_path, capsys):
    assert main(["ablate", "--variants", "base,A9", "--output", str(tmp_path / "x")]) == 2
    assert "--variants" in capsys.readouterr().err
    assert main(["ablate", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
