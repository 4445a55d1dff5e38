"""docs/design.md's "Departures from the release" against the two ImageNet configs: every setting
in which configs/imagenet_ds_mobilenet_v1_release.yml differs from dsnet's
configs/imagenet_ds_mobilenet_v1.yml is a row's key, with the release config's value.

A suite across the configs and the docs, tied to the release's recipe rather than to one module."""
import re
from pathlib import Path

from dsnet.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
# settings of the machine, not of the recipe (workers, validation batch, log lines, output)
BOOKKEEPING = {"data.num_workers", "data.val_batch_size", "train.log_interval", "output.dir"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table_keys() -> dict[str, str]:
    """{key: value} from the last column of the departures table (``section.key=value`` items)."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("## Departures from the release", 1)[1].split("\n## ", 1)[0]
    keys = {}
    for row in (line for line in table.splitlines() if re.match(r"\| \d+ \|", line)):
        for key, value in re.findall(r"([a-z_]+(?:\.[a-z_]+)+)=([^\s`]+)", row.rsplit("|", 2)[1]):
            keys.setdefault(key, value)
    return keys


def test_every_setting_the_release_config_changes_is_a_departure_with_its_value():
    ours = _flat(config_to_dict(load_config(ROOT / "configs" / "imagenet_ds_mobilenet_v1.yml")))
    release = _flat(config_to_dict(load_config(ROOT / "configs" / "imagenet_ds_mobilenet_v1_release.yml")))
    changed = {k for k in ours.keys() | release.keys() if ours.get(k) != release.get(k)} - BOOKKEEPING
    table = _table_keys()
    assert {"gate.holdout", "ieb.teacher", "gate.cost_unit", "model.kwargs.init"} <= changed
    assert changed <= set(table), sorted(changed - set(table))
    for key in changed:
        assert str(release[key]).lower() == table[key].lower() or float(release[key]) == float(table[key]), key
