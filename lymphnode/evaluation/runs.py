"""The runs of a sweep, read from their ``results.json`` files (and the folders that lack one).

A fine-tuning run's ``results.json`` (written by ``lymphnode.train``) holds ``status``
(``completed`` | ``failed`` | ``interrupted``; anything else counts as failed), ``init``
(``pretrained`` | ``scratch``), ``pretext`` (the pretrained runs' pretext task; absent in older
files: ``reconstruction``), ``labeled_size``, ``fold``, ``seed``, the test metrics of the
selected checkpoint (``metrics``) and of the last one (``metrics_last``), keyed
``test/seg_{precision,recall,f1}`` as fractions. Newer files also hold, and older ones may lack:

- ``pretext``: the pretext task a pretrained run started from (``reconstruction``, ``masked``,
  ``contrastive``, ``stain``, ...); null for scratch runs; absent in older files, where a pretrained
  run is ``reconstruction`` (the only pretext there was);

- ``selection``: ``val_f1`` | ``val_loss`` | ``last``, which checkpoint ``metrics`` are from;
- ``steps``: ``{"selected": int | null, "last": int | null}``, the optimizer step of each checkpoint;
- ``collapsed``: true when the selected checkpoint predicts no tumour (test recall 0); derived from
  the metrics when absent;
- ``metrics["test/baseline_all_tumour_f1"]``: F1 of predicting tumour on every test pixel.

- ``network`` / ``method``: the network's name (``unet``, ``smpunet``: the class name of
  ``model._target_`` in lower case) and the fine-tuning method (null: the paper's multi-task one);
  absent in older files, where they are the paper's.

Runs are grouped into **arms**, named as their run folders (``lymphnode.train``'s ``run_arm`` and
``arm_variant``): ``scratch`` (one run per size/fold/seed, shared by every pretext), ``pretrained``
(the paper's reconstruction pretext) and ``pretrained-<pretext>`` for any other pretext, each
followed by ``@<network>`` for a network other than the paper's UNet and ``+<method>`` for another
fine-tuning method, so that runs of different networks or methods are never averaged together.

The grid a report expects (to list the runs it lacks) is the product of the sizes, folds, seeds
and arms seen in the runs, united with the grid that each sweep's own ``multirun.yaml`` (Hydra's
record of a ``--multirun`` of the basic sweeper: ``hydra.sweeper.params`` and the command line's
``hydra.overrides.task``, the latter winning) defines over ``data.labeled_size``, ``data.fold``,
``seed``, ``init`` and ``pretext``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lymphnode.core.errors import LymphnodeError
from lymphnode.core.records import read_record

#: Inits in column order: the paper puts "without pretraining" first.
INITS: tuple[str, ...] = ("scratch", "pretrained")
#: The paper's pretext task: a pretrained run whose results.json names no pretext used it.
RECONSTRUCTION = "reconstruction"
#: The metrics of the paper's Figure 3, in column order.
METRICS: tuple[str, ...] = ("precision", "recall", "f1")
#: Checkpoints a report can read: the selected one (``metrics``) or the last (``metrics_last``).
#: ``best``: the run's selected checkpoint (``metrics``); ``last``: the final step
#: (``metrics_last``); a selection name: that entry of ``metrics_by_selection`` (runs trained with
#: ``compare_selections``), so one sweep compares checkpoint selections.
CHECKPOINTS: tuple[str, ...] = ("best", "last", "val_f1", "val_loss")
#: The paper's network, whose arms carry no ``@<network>`` (lymphnode.core.resolvers.network_name).
PAPER_NETWORK = "unet"
#: The all-tumour baseline's key in a run's metrics.
BASELINE_KEY = "test/baseline_all_tumour_f1"


class ReportError(LymphnodeError):
    """The sweep folders hold nothing that can be reported."""


@dataclass(frozen=True)
class Run:
    """One fine-tuning run as read from its folder.

    ``metrics`` holds the test metrics as fractions (0..1) keyed ``precision``, ``recall``, ``f1``;
    empty when the run failed, was interrupted or never finished. ``selection`` is the checkpoint
    the metrics are from (None when the file does not say), ``steps_selected`` / ``steps_last`` the
    optimizer steps of the selected and the last checkpoint, ``collapsed`` whether the reported
    checkpoint predicted no tumour at all, ``baseline_f1`` the all-tumour baseline's test F1,
    ``pretext`` the pretext task a pretrained run started from (None for scratch runs).
    """

    name: str
    init: str | None
    labeled_size: int | None
    fold: int | None
    seed: int | None
    status: str  # "completed" | "failed" | "interrupted" | "missing"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    selection: str | None = None
    steps_selected: int | None = None
    steps_last: int | None = None
    collapsed: bool = False
    baseline_f1: float | None = None
    pretext: str | None = None
    network: str | None = None  # None: the paper's UNet
    method: str | None = None  # None: the paper's multi-task fine-tuning

    @property
    def arm(self) -> str | None:
        """The run's arm (its run folder's first part): ``scratch``, ``pretrained``
        (reconstruction) or ``pretrained-<pretext>``, then ``@<network>`` / ``+<method>`` when
        they are not the paper's; None when the init is unknown."""
        if self.init is None:
            return None
        return arm_name(self.init, self.pretext, self.network, self.method)


def arm_name(
    init: str, pretext: str | None, network: str | None = None, method: str | None = None
) -> str:
    """The arm of a fine-tuning run of ``init`` from ``pretext``, as ``lymphnode.train`` names its
    run folder: ``scratch`` whatever the pretext, ``pretrained`` for reconstruction (or no pretext
    recorded), ``pretrained-<pretext>`` otherwise; then ``@<network>`` for a network other than
    the paper's UNet and ``+<method>`` for a method other than the paper's."""
    if init == "scratch":
        base = "scratch"
    else:
        base = init if pretext in (None, RECONSTRUCTION) else f"{init}-{pretext}"
    return base + arm_variant(network, method)


def arm_variant(network: str | None, method: str | None) -> str:
    """``""``, ``"@<network>"``, ``"+<method>"`` or both (the paper's network and method: none)."""
    out = "" if network in (None, PAPER_NETWORK) else f"@{network}"
    return out + ("" if method is None else f"+{method}")


_VARIANT = re.compile(r"^(?P<base>[^@+]+)(?:@(?P<network>[^@+]+))?(?:\+(?P<method>[^@+]+))?$")


def split_arm(arm: str) -> tuple[str, str | None, str | None]:
    """``(base arm, network, method)`` of an arm name: ``pretrained-masked@smpunet+semi`` →
    ``("pretrained-masked", "smpunet", "semi")``; the whole name as the base when it does not
    parse."""
    match = _VARIANT.match(arm)
    if match is None:
        return arm, None, None
    return match["base"], match["network"], match["method"]


def arm_pretext(arm: str) -> str | None:
    """The pretext task of an arm: None for ``scratch``, ``reconstruction`` for ``pretrained``,
    ``<pretext>`` for ``pretrained-<pretext>`` (whatever its ``@<network>`` / ``+<method>``)."""
    base = split_arm(arm)[0]
    if base == "scratch":
        return None
    return base.split("-", 1)[1] if "-" in base else RECONSTRUCTION


def scratch_of(arm: str) -> str:
    """The scratch arm an arm is compared with: ``scratch`` of the same network and method."""
    _, network, method = split_arm(arm)
    return "scratch" + arm_variant(network, method)


def order_arms(arms: Iterable[str]) -> list[str]:
    """Arms in table order: ``scratch``, ``pretrained`` (reconstruction), then the other pretexts
    by name — the same order whichever runs happen to be listed first; the paper's network and
    method first, then each other variant in the same order."""
    unique = set(arms)

    def key(arm: str) -> tuple:
        base, network, method = split_arm(arm)
        rank = {"scratch": 0, "pretrained": 1}.get(base, 2)
        return (network is not None, network or "", method is not None, method or "", rank, base)

    return sorted(unique, key=key)


def _pretext_error(value: object) -> str | None:
    """Why a results.json's ``pretext`` value cannot name an arm (None when it can)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "/" in value or value == "scratch":
        return (
            f"pretext={value!r} is not a pretext name (expected a non-empty string without '/' "
            "other than 'scratch', e.g. 'masked', or null for reconstruction)"
        )
    return None


def _metric_block(result: dict, checkpoint: str) -> dict:
    if checkpoint not in ("best", "last"):
        if result.get("selection") == checkpoint:  # the run's own selection
            return result.get("metrics") or {}
        entry = (result.get("metrics_by_selection") or {}).get(checkpoint)
        if not isinstance(entry, dict):
            raise ReportError(
                f"results.json has no metrics_by_selection[{checkpoint!r}] (checkpoint="
                f"{checkpoint!r} asked; train with compare_selections=[{checkpoint}])"
            )
        return entry.get("metrics") or {}
    key = "metrics" if checkpoint == "best" else "metrics_last"
    block = result.get(key)
    if block is None and checkpoint == "last":
        raise ReportError("results.json has no 'metrics_last' block (checkpoint='last' asked)")
    return block or {}


def _run_name(path: Path, root: Path) -> str:
    return str(path.parent.relative_to(root)) if path.is_relative_to(root) else str(path.parent)


def _finite_or_none(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_result(path: Path, root: Path, checkpoint: str) -> Run | None:
    """One ``results.json`` as a :class:`Run`; None for runs that are not fine-tuning runs."""
    try:
        result = read_record(path, what="results.json", error=ReportError)
        if result is None:  # removed since it was listed
            raise ReportError(f"{path} does not exist")
    except ReportError as exc:
        init, size, fold, seed = _identity_of(path.parent)
        folder_pretext = network = method = None
        if init is not None:  # run_arm + arm_variant's folder: <init>[-<pretext>][@<net>][+<m>]
            init, network, method = split_arm(init)
        if init is not None and init.startswith("pretrained-"):  # run_arm's folder of a pretext
            init, folder_pretext = "pretrained", init.partition("-")[2]
        if init is not None and init not in INITS:
            return None  # a corrupt pretraining record: not part of the table either
        if init == "pretrained" and folder_pretext is None:
            folder_pretext = RECONSTRUCTION
        return Run(
            name=_run_name(path, root), init=init, labeled_size=size, fold=fold, seed=seed,
            pretext=folder_pretext, network=network, method=method, status="failed",
            error=f"unreadable results.json ({exc}); the file is corrupt: train the run again "
            "(skip_if_done trains it again)",
        )  # fmt: skip
    init = result.get("init")
    if init not in INITS:  # the pretraining run, or something else: not part of the table
        return None
    status = result.get("status", "failed")
    if status not in ("completed", "failed", "interrupted"):
        status = "failed"  # e.g. "debug" (fast_dev_run): neither averaged nor silently dropped
    metrics: dict[str, float] = {}
    error = result.get("error")
    collapsed = False
    pretext = None if init == "scratch" else result.get("pretext")
    pretext_problem = _pretext_error(pretext)
    if pretext_problem is not None:  # not averaged into a made-up arm, listed as failed
        status, error, pretext = "failed", f"{pretext_problem} in {path}", None
    elif init == "pretrained" and pretext is None:
        pretext = RECONSTRUCTION  # older files: reconstruction was the only pretext
    if status == "completed":
        block = _metric_block(result, checkpoint)
        for metric in METRICS:
            value = _finite_or_none(block.get(f"test/seg_{metric}"))
            if value is None:
                status, error = "failed", f"test/seg_{metric} missing or not finite in {path}"
                metrics = {}
                break
            metrics[metric] = value
        if metrics:
            recorded = result.get("collapsed")
            if checkpoint == "best" and isinstance(recorded, bool):
                collapsed = recorded
            else:  # older files, or the last checkpoint (the flag is about the selected one)
                collapsed = metrics["recall"] == 0.0
    raw_steps = result.get("steps")
    steps: dict = raw_steps if isinstance(raw_steps, dict) else {}
    baseline = (result.get("metrics") or {}).get(BASELINE_KEY)
    if baseline is None:
        baseline = (result.get("metrics_last") or {}).get(BASELINE_KEY)
    return Run(
        name=_run_name(path, root),
        init=init,
        labeled_size=_int_or_none(result.get("labeled_size")),
        fold=_int_or_none(result.get("fold")),
        seed=_int_or_none(result.get("seed")),
        status=status,
        metrics=metrics,
        error=error,
        selection=result.get("selection") if checkpoint == "best" else checkpoint,
        steps_selected=_int_or_none(steps.get("selected")),
        steps_last=_int_or_none(steps.get("last")),
        collapsed=collapsed,
        baseline_f1=_finite_or_none(baseline) if status == "completed" else None,
        pretext=pretext,
        network=_name_or_none(result.get("network")),
        method=_name_or_none(result.get("method")),
    )


def _name_or_none(value: object) -> str | None:
    """A results.json's ``network`` / ``method`` as an arm word; None when absent, the paper's,
    or not a folder word."""
    if not isinstance(value, str) or not value or any(c in value for c in "/@+"):
        return None
    return None if value == PAPER_NETWORK else value


_RUN_PATH = re.compile(
    r"(?:^|/)(?P<init>[^/]+)/size(?P<size>\d+)/fold(?P<fold>\d+)/seed(?P<seed>\d+)$"
)


def _identity_of(run_dir: Path) -> tuple[str | None, int | None, int | None, int | None]:
    """(init, labeled_size, fold, seed) of a run folder whose results.json is corrupt: from the
    config Hydra saved beside it (``.hydra/config.yaml``), else from the run name
    ``<init>/size<N>/fold<K>/seed<S>``; Nones when neither tells. So that the run is counted
    once, as failed, and not also as missing from the grid."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)

            def pick(key: str) -> object:
                return OmegaConf.select(cfg, key, default=None)

            init = "pretrain" if pick("stage") == "pretrain" else pick("init")
            if init is not None and init != "pretrain":
                method = pick("method")
                init = f"{init}{arm_variant(_network_of(pick('model._target_')), _name_or_none(method))}"
            return (
                None if init is None else str(init),
                _int_or_none(pick("data.labeled_size")),
                _int_or_none(pick("data.fold")),
                _int_or_none(pick("seed")),
            )
        except Exception:  # an unreadable saved config: fall back to the folder's name
            pass
    match = _RUN_PATH.search(run_dir.as_posix())
    if match is None:
        return None, None, None, None
    return match["init"], int(match["size"]), int(match["fold"]), int(match["seed"])


def _network_of(target: object) -> str | None:
    """The arm word of a ``model._target_`` (None: the paper's UNet or not a class path)."""
    from lymphnode.core.resolvers import network_name

    if not isinstance(target, str) or not target or "${" in target:
        return None
    return _name_or_none(network_name(target))


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _plain(value: object) -> object:
    """A config value as written, or None when it is an unresolved interpolation (``${...}``)."""
    return None if isinstance(value, str) and "${" in value else value


def _dig(tree: object, dotted: str) -> object:
    """``tree["a"]["b"]`` for ``"a.b"`` in nested dicts; None where a part is absent."""
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _load_yaml(path: Path, what: str) -> dict:
    """A YAML mapping (Hydra's ``multirun.yaml``, a job's ``.hydra/config.yaml``), interpolations
    left as written."""
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReportError(f"{what} {path} is not readable YAML ({exc})") from exc
    if not isinstance(tree, dict):
        raise ReportError(
            f"{what} {path} holds a {type(tree).__name__}, expected a mapping (a Hydra config)"
        )
    return tree


def _orphan_run(run_dir: Path, root: Path) -> Run:
    """A Hydra run folder (``.hydra/`` present) that never wrote results.json: a killed run.

    Its grid point comes from the job's ``overrides.yaml`` and, for what that does not name (a
    value the sweep did not vary, e.g. ``seed``), from the job's composed ``config.yaml``.
    """
    overrides: dict[str, str] = {}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for line in overrides_file.read_text().splitlines():
            item = line.strip().lstrip("-").strip().strip("'\"")
            if "=" in item:
                key, raw = item.split("=", 1)
                overrides[key.lstrip("+~")] = raw
    try:
        config = _load_yaml(run_dir / ".hydra" / "config.yaml", "the job config")
    except ReportError:
        config = {}  # the orphan is listed as missing all the same, with what overrides say

    def setting(key: str) -> object:
        return overrides[key] if key in overrides else _plain(_dig(config, key))

    def pick(key: str) -> int | None:
        try:
            return _int_or_none(setting(key))
        except (TypeError, ValueError):
            return None

    init = setting("init")
    # the group override (pretext=masked) names the pretext; else the composed pretext.name
    pretext = overrides["pretext"] if "pretext" in overrides else setting("pretext.name")
    if init not in INITS:
        init = None
    if init == "scratch" or not isinstance(pretext, str) or _pretext_error(pretext):
        pretext = None
    if init == "pretrained" and pretext is None:
        pretext = RECONSTRUCTION
    method = setting("method")
    return Run(
        name=str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir),
        network=_network_of(_plain(_dig(config, "model._target_"))),
        method=_name_or_none(None if method in (None, "null") else method),
        init=init,  # type: ignore[arg-type]
        labeled_size=pick("data.labeled_size"),
        fold=pick("data.fold"),
        seed=pick("seed"),
        status="missing",
        error="no results.json (the run was killed or never finished)",
        pretext=pretext,
    )


#: The config keys of a sweep that span the table's grid, and the override that sets each one.
_GRID_KEYS = {
    "size": "data.labeled_size",
    "fold": "data.fold",
    "seed": "seed",
    "init": "init",
    "pretext": "pretext",  # the config group; its option is the pretext's name
    "model": "model",  # the config group; its option's _target_ names the network
    "method": "method",
}


def _option_network(option: str) -> str | None:
    """The arm word of the network that ``model=<option>`` selects (conf/model/<option>.yaml's
    ``_target_``); None for the paper's UNet or an option that cannot be read."""
    from lymphnode.core.boundary import config_dir

    try:
        tree = yaml.safe_load((Path(config_dir()) / "model" / f"{option}.yaml").read_text())
    except (OSError, yaml.YAMLError, LymphnodeError):
        return None
    return _network_of(tree.get("_target_") if isinstance(tree, dict) else None)


def sweep_grid(path: str | Path) -> list[tuple[str, int, int, int]]:
    """The fine-tuning runs a sweep's ``multirun.yaml`` defines: (arm, labeled size, fold, seed).

    Hydra's basic sweeper runs the product of ``hydra.sweeper.params`` and the command line's
    ``hydra.overrides.task`` (a key on the command line replaces the same key of the params); an
    axis that neither sweeps takes its value from the composed config. Scratch runs count once per
    (size, fold, seed) however many pretexts the sweep names, as they share one run folder. Empty
    for a sweep of another sweeper (its params are not a grid), of pretraining, or whose grid
    values are interpolations (then the runs seen define the grid). A file that is not YAML, or
    overrides that do not parse, are a :class:`ReportError` naming the file.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    path = Path(path)
    tree = _load_yaml(path, "sweep definition")
    sweeper = _dig(tree, "hydra.sweeper._target_")
    if not (isinstance(sweeper, str) and sweeper.endswith("BasicSweeper")):
        return []
    params = _dig(tree, "hydra.sweeper.params") or {}
    task = _dig(tree, "hydra.overrides.task") or []
    if not isinstance(params, dict) or not isinstance(task, list):
        raise ReportError(
            f"sweep definition {path}: hydra.sweeper.params must be a mapping and "
            f"hydra.overrides.task a list, got {type(params).__name__} and {type(task).__name__}"
        )
    lines = [f"{key}={value}" for key, value in params.items()] + [str(t) for t in task]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except HydraException as exc:
        raise ReportError(f"sweep definition {path}: overrides do not parse ({exc})") from exc
    swept: dict[str, list[str]] = {}
    for override in overrides:
        if override.is_delete():
            continue
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return []  # the basic sweeper refuses these; no grid to read
            swept[override.key_or_group] = list(override.sweep_string_iterator())
        else:
            swept[override.key_or_group] = [override.get_value_element_as_str()]
    if swept.get("stage", [_dig(tree, "stage")]) != ["finetune"]:
        return []
    base = {
        "size": _dig(tree, "data.labeled_size"),
        "fold": _dig(tree, "data.fold"),
        "seed": _dig(tree, "seed"),
        "init": _dig(tree, "init"),
        "pretext": _dig(tree, "pretext.name") if isinstance(tree.get("pretext"), dict) else None,
        "model": None,  # the composed network, unless the sweep names model options
        "method": _dig(tree, "method"),
    }
    axes: dict[str, list] = {}
    for axis, key in _GRID_KEYS.items():
        values = swept.get(key, [base[axis]])
        if axis == "pretext" and "pretext.name" in swept:
            values = swept["pretext.name"]
        if any(_plain(v) is None and axis not in ("pretext", "model", "method") for v in values):
            return []
        axes[axis] = values
    try:
        sizes, folds, seeds = (sorted({int(v) for v in axes[a]}) for a in ("size", "fold", "seed"))
    except (TypeError, ValueError):
        return []
    networks = [
        _network_of(_dig(tree, "model._target_")) if option is None else _option_network(option)
        for option in axes["model"]
    ]
    methods = [_name_or_none(None if m in (None, "null") else str(m)) for m in axes["method"]]
    arms: set[str] = set()
    for init in axes["init"]:
        if init not in INITS:
            continue
        for pretext in axes["pretext"]:
            name = None if pretext in (None, "null") else str(pretext)
            if init == "pretrained" and _pretext_error(name) is not None:
                continue
            arms.update(arm_name(init, name, n, m) for n in networks for m in methods)
    return [
        (arm, size, fold, seed)
        for arm in order_arms(arms)
        for size in sizes
        for fold in folds
        for seed in seeds
    ]


def _grid_key(run: Run) -> tuple:
    return (run.arm, run.labeled_size, run.fold, run.seed)


def collect_runs(
    dirs: Sequence[str | Path], checkpoint: str = "best", sweeps: bool = True
) -> list[Run]:
    """Every fine-tuning run below ``dirs``, completed, failed or left without results.json; with
    ``sweeps``, also (status ``missing``) the runs that a ``multirun.yaml`` below ``dirs``
    defines and that no run folder accounts for (see :func:`sweep_grid`)."""
    if checkpoint not in CHECKPOINTS:
        raise ReportError(f"checkpoint={checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    runs: list[Run] = []
    definitions: list[tuple[Path, Path]] = []
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ReportError(f"sweep folder {root} does not exist (expected a folder of runs)")
        results = sorted(root.rglob("results.json"))
        done_dirs = {p.parent for p in results}
        for path in results:
            run = _read_result(path, root, checkpoint)
            if run is not None:
                runs.append(run)
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            if run_dir not in done_dirs and (hydra_dir / "config.yaml").is_file():
                runs.append(_orphan_run(run_dir, root))
        definitions += [(root, p) for p in sorted(root.rglob("multirun.yaml"))]
    if sweeps:
        present = {_grid_key(r) for r in runs}
        for root, path in definitions:
            prefix = path.parent.relative_to(root)
            for arm, size, fold, seed in sweep_grid(path):
                if (arm, size, fold, seed) in present:
                    continue
                present.add((arm, size, fold, seed))
                pretext = arm_pretext(arm)
                runs.append(
                    Run(
                        name=str(prefix / arm / f"size{size}" / f"fold{fold}" / f"seed{seed}"),
                        init="scratch" if pretext is None else "pretrained",
                        labeled_size=size,
                        fold=fold,
                        seed=seed,
                        status="missing",
                        error=f"defined by the sweep {path}, no run folder found",
                        pretext=pretext,
                        network=split_arm(arm)[1],
                        method=split_arm(arm)[2],
                    )
                )
    return runs


def expected_missing(runs: list[Run]) -> list[Run]:
    """Grid points (size × fold × arm × seed seen anywhere) that no run folder accounts for.

    The scratch arm is one grid axis value like any pretext's: a sweep over pretexts expects one
    scratch run per (size, fold, seed), not one per pretext.
    """
    known = [r for r in runs if r.labeled_size is not None and r.fold is not None and r.arm]
    sizes = sorted({r.labeled_size for r in known})  # type: ignore[type-var]
    folds = sorted({r.fold for r in known})  # type: ignore[type-var]
    seeds = sorted({r.seed for r in known}, key=lambda s: -1 if s is None else s)
    arms = order_arms(r.arm for r in known if r.arm is not None)
    present = {_grid_key(r) for r in known}
    out = []
    for size in sizes:
        for fold in folds:
            for arm in arms:
                for seed in seeds:
                    if (arm, size, fold, seed) not in present:
                        pretext = arm_pretext(arm)
                        out.append(
                            Run(
                                name=f"{arm}/size{size}/fold{fold}/seed{seed}",
                                init="scratch" if pretext is None else "pretrained",
                                labeled_size=size,
                                fold=fold,
                                seed=seed,
                                status="missing",
                                error="expected by the grid, no run folder found",
                                pretext=pretext,
                                network=split_arm(arm)[1],
                                method=split_arm(arm)[2],
                            )
                        )
    return out
