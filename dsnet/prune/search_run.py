"""``dsnet search CHECKPOINT --target-madds 10M``: greedy slimming of a trained supernet
(``dsnet.prune.search``) on its run's data, and what it writes.

The images: ``--holdout F`` of the training set is held back (``dsnet.train.runs.holdout_split``,
seeded with ``train.seed``: the split stage two makes with ``gate.holdout``, the default) and
``--images N`` of those, drawn with the same seed, score the candidates; ``--calib-batches N``
batches of the remaining training images (training transforms) re-estimate each candidate's BN
statistics. The stage-one supernet trained on every training image: held back here means unseen
by calibration and never the validation set.

Beside the architecture record (``-o FILE.json``, default
``<run>/search-<target>/architecture.json``, the format ``--static-arch`` reads), its folder gets
``search.json`` (every step's candidates and scores, the uniform subnets scored the same way, the
cost), ``search.png`` (holdout top-1 vs MAdds, with matplotlib), ``checkpoints/last.pth`` (a stage
``static`` checkpoint of the plain model with the supernet's weights, its statistics re-estimated
on ``train.recalibrate_batches`` batches: what ``dsnet evaluate``, ``export``, ``bench`` and
``profile`` read) and ``eval.json`` (that model on the validation set, for ``dsnet compare``).
Nothing is written before the search has finished, and nothing is overwritten.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from dsnet import data as dsdata
from dsnet.config import config_to_dict
from dsnet.errors import UserError
from dsnet.models.madds import parse_madds
from dsnet.prune.arch import arch_cost, save_architecture, subnet_architecture
from dsnet.prune.search import Scorer, ScoringSet, SearchResult, check_target, greedy_search
from dsnet.prune.static import baseline_report, tag_plain
from dsnet.train.checkpoint import save_checkpoint
from dsnet.train.engine import autocast_factory, load_run
from dsnet.train.evaluate import evaluate_plain
from dsnet.train.runs import Data, build_data, data_signature, input_shape, write_eval

__all__ = ["MIN_HOLDOUT", "IMAGES", "CALIB_BATCHES", "search_outputs", "scoring_set", "plot_search", "search_command"]

logger = logging.getLogger(__name__)

MIN_HOLDOUT = 100   # below it one image moves top-1 by more than a point, as much as a step costs
IMAGES = 2000       # default --images
CALIB_BATCHES = 4   # default --calib-batches


def search_outputs(checkpoint: str | Path, target_text: str, output: str | None) -> dict[str, Path]:
    """The files a search writes (module docs); UserError if any exists."""
    ckpt = Path(checkpoint)
    if output is None:
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        arch = run / f"search-{target_text}" / "architecture.json"
    else:
        arch = Path(output) if output.endswith(".json") else Path(output) / "architecture.json"
    folder = arch.parent
    paths = {"architecture": arch, "log": folder / "search.json", "plot": folder / "search.png",
             "checkpoint": folder / "checkpoints" / "last.pth", "eval": folder / "eval.json"}
    for path in paths.values():
        if path.exists():
            raise UserError(f"{path} exists; choose another -o (dsnet search never overwrites its outputs)")
    return paths


def scoring_set(data: Data, images: int, calib_batches: int, seed: int, holdout: float) -> ScoringSet:
    """``images`` of the held-back training images (a seeded draw) and ``calib_batches`` batches of
    the calibration loader; UserError when fewer than ``MIN_HOLDOUT`` images are held back."""
    held = data.holdout.dataset if data.holdout is not None else []
    count = min(images, len(held))
    if count < MIN_HOLDOUT:
        raise UserError(f"the search would score candidates on {count} held-back training images (--holdout "
                        f"{holdout:g}, --images {images}); it needs at least {MIN_HOLDOUT}: "
                        f"raise --holdout or --images")
    pick = sorted(torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    loader = dsdata.build_loader(torch.utils.data.Subset(held, pick), data.holdout.batch_size, False,
                                 num_workers=data.holdout.num_workers)
    return ScoringSet([x for x, _ in itertools.islice(data.calib, calib_batches)], list(loader))


def plot_search(log: dict, path: str | Path) -> bool:
    """Holdout top-1 vs MAdds along the search, with the uniform subnets; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([s["madds"] / 1e6 for s in log["steps"]], [s["top1"] for s in log["steps"]], ".-",
            label="greedy slimming, step by step")
    ax.plot([u["madds"] / 1e6 for u in log["uniform"]], [u["top1"] for u in log["uniform"]], "o--",
            label="uniform subnets (static routes)")
    ax.axvline(log["target_madds"] / 1e6, color="grey", linestyle=":", label="target")
    ax.set_xlabel("MAdds per image (M)")
    ax.set_ylabel(f"top-1 on {log['holdout_images']} held-back training images (%)")
    ax.set_title(f"dsnet search ({log['model']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _log(result: SearchResult, uniform: list[dict], scoring: ScoringSet, target: float, checkpoint: str,
         model: str, evaluations: int, wall: float) -> dict:
    """``search.json``: the search's settings, cost (``evaluations`` with the uniform subnets'), steps."""
    calib = sum(len(x) for x in scoring.calib)
    return {"format": "dsnet-search", "version": 1, "model": model, "checkpoint": str(checkpoint),
            "target_madds": target, "step": "one choice of each channel space's width list",
            "selection": "least holdout top-1 lost per MAdd saved, then the lower holdout loss",
            "holdout_images": scoring.num_holdout, "calib_images": calib, "evaluations": evaluations,
            "images_per_evaluation": calib + scoring.num_holdout, "wall_s": round(wall, 1),
            "steps": result.steps, "uniform": uniform}


def search_command(checkpoint: str, target_madds: str, output: str | None = None, holdout: float | None = None,
                   images: int = IMAGES, calib_batches: int = CALIB_BATCHES, data_root: str | None = None,
                   overrides: Sequence[str] = ()) -> str:
    """``dsnet search`` (module docs); returns the summary it prints."""
    target = parse_madds(target_madds)
    if images < 1 or calib_batches < 1:
        raise UserError(f"--images and --calib-batches take positive counts, got {images} and {calib_batches}")
    paths = search_outputs(checkpoint, target_madds, output)
    state, supernet, cfg, runtime = load_run(checkpoint, overrides, data_root, stages=("supernet", "gate"))
    if runtime.distributed:
        raise UserError("dsnet search runs in one process: start it without torchrun")
    size = input_shape(cfg, supernet)
    check_target(supernet, target, size)
    holdout = cfg.gate.holdout if holdout is None else holdout
    if not 0 < holdout < 0.5:
        raise UserError(f"--holdout is the fraction of training images held back to score candidates, in (0, 0.5); "
                        f"got {holdout:g}")
    data = build_data(cfg, runtime, holdout)
    if state.get("classes") is not None and list(state["classes"]) != data.classes:
        raise UserError(f"{cfg.data.root} has {len(data.classes)} classes, the checkpoint was trained on "
                        f"{len(state['classes'])}; pass --data with the dataset it was trained on")
    scoring = scoring_set(data, images, calib_batches, cfg.train.seed, holdout)
    autocast = autocast_factory(cfg.train.amp, runtime.device)[0]
    scorer = Scorer(supernet, scoring, size, runtime.device, autocast, cfg.train.channels_last)
    start = time.perf_counter()
    result = greedy_search(scorer, target, cfg.train.progress)
    uniform = [{"subnet": i, **_score(scorer, subnet_architecture(supernet, i))} for i in range(supernet.num_subnets)]
    log = _log(result, uniform, scoring, target, checkpoint, supernet.model_name, scorer.evaluations,
               time.perf_counter() - start)
    # the shipped model: statistics re-estimated as stage one's subnets' are, on train.recalibrate_batches batches
    final = ScoringSet([x for x, _ in itertools.islice(data.calib, cfg.train.recalibrate_batches)], scoring.holdout)
    shipped, model = Scorer(supernet, final, size, runtime.device, autocast, cfg.train.channels_last).full(result.arch)
    model = tag_plain(model.to(memory_format=torch.contiguous_format), supernet)
    acc = evaluate_plain(model, data.val, runtime.device, autocast)
    cost = arch_cost(supernet, result.arch, size)
    record = {"method": "search", "subnet": "arch", "target_madds": target, "supernet": str(checkpoint),
              "holdout_top1": shipped.top1, "holdout_images": scoring.num_holdout,
              "recalibrate_batches": cfg.train.recalibrate_batches, "evaluations": scorer.evaluations,
              "wall_s": log["wall_s"]}
    log["final"] = {"madds": cost.madds, "params": cost.params, "widths": dict(result.arch.widths),
                    "holdout_top1": shipped.top1, "val_top1": acc["top1"], "val_top5": acc["top5"]}
    report = {**baseline_report("arch", cost, acc), "baseline": record, "data": data_signature(cfg, data.classes)}
    save_checkpoint({"stage": "static", "model_name": supernet.model_name, "model_kwargs": dict(supernet.model_kwargs),
                     "model": model.state_dict(), "ema": None, "config": config_to_dict(cfg), "classes": data.classes,
                     "subnet": "arch", "architecture": result.arch.to_dict(), "baseline": record,
                     "epoch": 0, "step": 0, "total_steps": 0, "metrics": {"eval": report}}, paths["checkpoint"])
    save_architecture(result.arch, paths["architecture"])
    paths["log"].write_text(json.dumps(log, indent=2) + "\n")
    write_eval(paths["eval"], report)
    plotted = plot_search(log, paths["plot"])
    return (f"searched {supernet.model_name} down to {cost.madds / 1e6:.2f}M MAdds (target {target / 1e6:.2f}M) in "
            f"{len(result.steps) - 1} steps, {scorer.evaluations} evaluations of {log['images_per_evaluation']} "
            f"images, "
            f"{log['wall_s']:.0f} s\nholdout top-1 {shipped.top1:.2f}, validation top-1 {acc['top1']:.2f} "
            f"(inherited weights, recalibrated)\n-> {paths['architecture']}\n-> {paths['checkpoint']}\n"
            f"-> {paths['log']}" + (f"\n-> {paths['plot']}" if plotted else
                                    "\n(no plot: pip install 'dsnet[plot]' for matplotlib)"))


def _score(scorer: Scorer, arch) -> dict:
    score = scorer.full(arch)[0]
    return {"madds": score.madds, "top1": score.top1, "loss": score.loss}
