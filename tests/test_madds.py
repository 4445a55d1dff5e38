"""``dsnet profile`` (``dsnet.madds.profile_command``): the JSON contract of DESIGN.md, the table,
and one-line errors with exit status 2."""
from __future__ import annotations

import json

import pytest
import timm

import dsnet
from dsnet.cli import main


def test_profile_json_matches_the_contract_and_the_counters(capsys):
    assert main(["profile", "ds_mobilenet_v1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"model", "input_size", "largest", "subnets"}
    assert report["model"] == "ds_mobilenet_v1"
    assert report["input_size"] == [3, 224, 224]
    model = timm.create_model("ds_mobilenet_v1")
    assert report["largest"] == {"madds": dsnet.count_madds(model, "largest"),
                                 "params": dsnet.count_params(model, "largest")}
    assert report["subnets"] == [{"subnet": i, "madds": dsnet.count_madds(model, i),
                                  "params": dsnet.count_params(model, i)}
                                 for i in range(model.num_subnets)]
    assert len(report["subnets"]) == 14
    assert all(type(v) is int for row in report["subnets"] for v in row.values())


def test_profile_input_size_changes_the_madds(capsys):
    assert main(["profile", "ds_resnet20", "--input-size", "3", "64", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = timm.create_model("ds_resnet20")
    assert report["input_size"] == [3, 64, 64]
    assert report["largest"]["madds"] == dsnet.count_madds(model, "largest", (3, 64, 64))
    assert report["largest"]["madds"] > dsnet.count_madds(model, "largest", (3, 32, 32))


def test_profile_table(capsys):
    assert main(["profile", "ds_resnet20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ds_resnet20") and "3x32x32" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "2", "3", "largest"]


@pytest.mark.parametrize("argv,names", [
    (["profile", "ds_nonet"], ["'ds_nonet'", "ds_mobilenet_v1", "ds_resnet20"]),
    (["profile", "ds_resnet20", "--input-size", "3", "0", "32"], ["--input-size", "[3, 0, 32]"]),
    (["profile", "ds_resnet20", "--input-size", "1", "32", "32", "--json"], ["channels must be 3"]),
])
def test_profile_bad_input_is_one_line_and_exit_2(capsys, argv, names):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dsnet profile: error: ")
    for name in names:
        assert name in lines[0]
