"""``dsnet profile`` (``dsnet.report.profile.profile_command``): the JSON contract of DESIGN.md, the table,
one plain model (a static baseline checkpoint or an architecture file) costing exactly what
FlopCounterMode and the module count, and one-line errors with exit status 2."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.prune.arch import Architecture
from dsnet.train.checkpoint import read_checkpoint
from dsnet.cli import main
from dsnet.report.profile import static_profile
from tests.test_arch import _pool_adds


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


# ---- one plain model: a static baseline checkpoint or an architecture file ----------------------

@pytest.fixture(scope="module")
def statics(tmp_path_factory):
    from dsnet.prune.arch import save_architecture
    from tests.test_export import static_checkpoints

    folder = tmp_path_factory.mktemp("static")
    found = static_checkpoints(folder)
    arch = Architecture.from_dict(read_checkpoint(found["arch"][0], "static")["architecture"])
    found["json"] = (str(save_architecture(arch, folder / "arch.json")), found["arch"][1])
    return found


@pytest.mark.parametrize("kind", ["subnet", "arch", "sss", "json"])
def test_profile_of_a_static_checkpoint_or_architecture_is_what_flop_counter_and_the_module_count(
        statics, kind, capsys):
    path, plain = statics[kind]
    assert main(["profile", path, "--json", "--input-size", "3", "40", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plain(x)
    assert report == {"model": "ds_resnet20", "source": path, "input_size": [3, 40, 32],
                      "subnet": {"subnet": 1, "sss": "largest"}.get(kind, "arch"),
                      "madds": counter.get_total_flops() // 2 // 2 + _pool_adds(plain, x[:1]),
                      "params": sum(p.numel() for p in plain.parameters())}
    assert main(["profile", path, "--input-size", "3", "40", "32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ds_resnet20 ") and path in lines[0] and "3x40x32" in lines[0]
    assert lines[1].startswith(f"MAdds {report['madds'] / 1e6:.3f} M, params {report['params'] / 1e6:.4f} M")


def test_a_static_cost_that_is_not_the_measured_one_is_a_bug(statics, monkeypatch):
    import dsnet.report.profile

    real = dsnet.prune.static.static_cost
    monkeypatch.setattr(dsnet.report.profile, "static_cost", lambda *a: real(*a)._replace(params=real(*a).params + 1))
    with pytest.raises(ValueError, match=r"dsnet's analytic \(MAdds, params\) .* differ from the model's measured .*"
                                         r"this is a dsnet bug"):
        static_profile(statics["subnet"][0])


@pytest.mark.parametrize("name,content,message", [
    ("absent.pth", None, "'{path}' is neither a dsnet model name (ds_mobilenet_v1"),
    ("other.json", '{{"widths": {{}}}}', '{path} is not a dsnet architecture: expected a JSON object with "format"'),
    ("broken.json", "{{not json", "{path} is not JSON (Expecting property name"),
])
def test_profile_of_a_bad_file_is_one_sentence(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content.format())
    assert main(["profile", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("dsnet profile: error: " + message.format(path=path)), lines[0]
