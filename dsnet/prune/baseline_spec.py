"""What one static baseline run trains: its method, run directory and options, checked together.

``baseline_spec`` turns ``train_static``'s arguments (the ``dsnet train-baseline`` flags) into a
``BaselineSpec`` or one UserError naming the combination that does not go, before anything runs.
The method is what ``dsnet compare`` groups by; the run directory is ``<method>-<subnet>``
(``scratch-b-subnet0``, ``l1-subnet2``), ``weight<S>-largest`` and ``<budget>-weight<S>-largest``
for weight pruning, and ``dsnet.prune.found``'s names for slimming, SSS and ``--static-arch`` runs
(``inherited-<label>`` for an architecture fine-tuned from the supernet, as ``scratch-e-<label>``).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsnet.errors import UserError
from dsnet.models.net import DSNet
from dsnet.prune import found
from dsnet.prune.arch import Architecture, load_architecture
from dsnet.prune.budgets import BUDGETS, Subnet
from dsnet.prune.reconstruct import METHODS as RECONSTRUCTIONS

__all__ = ["INHERITED", "PRUNERS", "METHODS", "BaselineSpec", "baseline_spec", "run_name", "parse_subnet",
           "check_subnet"]

INHERITED = "inherited"  # no pruning: the supernet's own weights at a subnet or architecture, fine-tuned
PRUNERS = ("l1", *RECONSTRUCTIONS, "weight", *found.FINDERS, INHERITED)
METHODS = (*BUDGETS, *PRUNERS)


def run_name(method: str, subnet: Subnet) -> str:
    return f"{method}-{'largest' if subnet == 'largest' else f'subnet{subnet}'}"


def parse_subnet(text: str | int) -> Subnet:
    """``--static-subnet`` value: an index or ``largest``."""
    if text == "largest" or isinstance(text, int):
        return text
    if not str(text).isdigit():
        raise UserError(f"--static-subnet must be a subnet index (0 = slimmest) or 'largest', got '{text}'")
    return int(text)


def check_subnet(supernet: DSNet, subnet: Subnet) -> None:
    """Refuse a ``--static-subnet`` that ``supernet`` does not have."""
    if subnet != "largest" and not 0 <= subnet < supernet.num_subnets:
        raise UserError(f"--static-subnet {subnet} is out of range: {supernet.model_name} has "
                         f"{supernet.num_subnets} static subnets (0..{supernet.num_subnets - 1}) and 'largest'")


@dataclass(frozen=True)
class BaselineSpec:
    """What one baseline run trains, checked: its method (``compare``'s series), run directory
    name and options (``train_static``'s arguments)."""

    method: str
    name: str
    subnet: Subnet
    budget: str
    prune: str | None = None
    sparsity: float | None = None
    ratio: float | None = None
    penalty: float | None = None        # slimming's s or SSS's gamma
    penalty_training: str | None = None  # "slimming" / "sss": the penalty-trained largest route
    arch: Architecture | None = None     # --static-arch
    arch_file: str | None = None


def baseline_spec(subnet: Subnet | None, budget: str, prune: str | None, sparsity: float | None, finetune_epochs: int,
          ratio: float | None, static_arch: str | None, penalties: dict[str, float | None],
          penalty_training: tuple[str, float] | None) -> BaselineSpec:
    """The run's ``BaselineSpec``; UserError naming a bad combination of options."""
    if prune is not None and prune not in PRUNERS:
        raise UserError(f"--prune must be one of {', '.join(PRUNERS)}, got '{prune}'")
    if budget not in BUDGETS:
        raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got '{budget}'")
    if finetune_epochs < 1:
        raise UserError(f"--finetune-epochs must be a positive integer, got {finetune_epochs}")
    if static_arch is not None:
        if subnet is not None or prune not in (None, INHERITED) or sparsity is not None:
            raise UserError("--static-arch trains that architecture from scratch or, with --prune inherited, "
                            "fine-tunes it from the supernet: give it with --budget or --prune inherited alone, "
                            "without --static-subnet, another --prune or --sparsity")
        arch = load_architecture(static_arch)[0]
        method = INHERITED if prune else f"{budget}-arch"
        return BaselineSpec(method, f"{prune or budget}-{found.arch_label(static_arch)}", "arch", budget, prune,
                     arch=arch, arch_file=str(static_arch))
    if subnet is None:
        raise UserError("a baseline needs --static-subnet I (or 'largest') or --static-arch FILE")
    penalty = found.check_finder(prune, subnet, ratio, penalties)
    if penalty_training is not None:
        kind, penalty = penalty_training
        return BaselineSpec(f"{kind}-train", found.train_run_name(kind, penalty), "largest", budget,
                     penalty=penalty, penalty_training=kind)
    if penalty is not None:
        if sparsity is not None:
            raise UserError(f"--sparsity goes with --prune weight; --prune {prune} finds its own architecture")
        return BaselineSpec(prune, found.found_run_name(prune, penalty, ratio), "arch", budget, prune,
                     ratio=ratio, penalty=penalty)
    _check_sparsity(subnet, prune, sparsity)
    method = prune or budget
    if sparsity is None:
        return BaselineSpec(method, run_name(method, subnet), subnet, budget, prune)
    name = run_name(f"weight{sparsity:g}" if prune == "weight" else f"{method}-weight{sparsity:g}", subnet)
    return BaselineSpec(method, name, subnet, budget, prune, sparsity)


def _check_sparsity(subnet: Subnet, prune: str | None, sparsity: float | None) -> None:
    if prune == "weight" and (subnet != "largest" or sparsity is None):
        raise UserError("--prune weight keeps the largest route's shape and zeroes a fraction of its weights: "
                         "give --static-subnet largest and --sparsity S (e.g. 0.5)")
    if prune not in (None, "weight", INHERITED) and subnet == "largest":
        raise UserError(f"--prune {prune} needs --static-subnet I, the subnet whose width to prune to")
    if sparsity is not None and prune not in (None, "weight"):
        raise UserError("--sparsity sets the fraction of weights --prune weight zeroes; it goes with --prune weight "
                        "or, to train that sparse structure from scratch, with --budget alone")
    if sparsity is not None and subnet != "largest":
        raise UserError("--sparsity keeps the largest route's shape with a fraction of its weights zero: "
                        "give --static-subnet largest")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity must be a fraction in [0, 1) of the weights to prune, got {sparsity}")
