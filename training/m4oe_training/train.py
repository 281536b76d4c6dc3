"""The M4oE training loop: stages of one recipe, DDP when launched by torchrun, resumable.

Short and linear, nanoGPT style. Per step: draw a batch (deterministic from seed, rank and step),
augment it, compute the stage's loss through :class:`.stage_loss.StageLoss` (the same code for every stage
kind), step the optimiser with a poly learning rate. Per epoch: validate on whole held-out volumes
through the engine's Predictor (rank 0), export the best model, save a resumable state.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from m4oe import __version__
from m4oe.io import write_atomic
from m4oe.model import build_model, get_config, load_imagenet_weights
from m4oe.preprocessing import DEFAULT_PARAMS

from .augment import build_augmentation
from .batches import BatchPlan, BatchSource, step_seed
from .config import ConfigError, TrainConfig
from .data import DatasetInfo, SliceData, ct_intensity_params, split_cases
from .export import (
    build_card,
    expert_modalities,
    export_model,
    label_lookups,
    labelled_classes,
    lineage,
    task_labels,
)
from .init_model import (
    inherit_preprocessing,
    init_intensity,
    init_overrides,
    initial_state,
    load_initial_weights,
    read_init,
)
from .mome import LabelSpace, MoMELoss, build_mome, build_mome_from, is_mome, label_space
from .optim import frozen_parameters, group_lr, parameter_groups, stage_lr
from .stage_loss import StageLoss
from .state import folder_lock, load_ema, load_state, recover_state, save_state
from .validation import log_view, missed_warnings, validate

logger = logging.getLogger("m4oe_training")
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


def distributed_setup(device: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device; joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # Rank 0 validates whole volumes while the other ranks wait in the next step's all-reduce:
        # on a real dataset that takes longer than the default collective timeout (10 min for NCCL).
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world, dev


def portable_path(path: str | Path, base: Path | None = None) -> str:
    """``path`` relative to ``base`` (default: the working directory) when it lies under it, else as given.

    The card's provenance records data and init paths this way, so that with its ``command`` (also
    relative to the working directory) it reads the same on any machine and does not carry the
    trainer's home folder.
    """
    base = Path.cwd() if base is None else base
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def portable_config(config: dict) -> dict:
    """``TrainConfig.to_dict()`` with dataset, ``init`` and ``imagenet`` paths made :func:`portable_path`."""
    config = dict(config)
    config["datasets"] = [dict(d, path=portable_path(d["path"])) for d in config.get("datasets", [])]
    for key in ("init", "imagenet"):
        if isinstance(config.get(key), str):
            config[key] = portable_path(config[key])
    return config


def data_keys(infos: list[DatasetInfo]) -> list[str]:
    """Names for the datasets in the card's provenance: folder names, made unique by position when two
    folders share a name (``0:ct``, ``1:ct``)."""
    names = [info.name for info in infos]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{name}" for i, name in enumerate(names)]


def check_validation_cases(cfg: TrainConfig, infos: list[DatasetInfo]) -> None:
    """Refuse, with what to set, a ``val_cases`` that leaves a dataset nothing to train on."""
    for i, (d, info) in enumerate(zip(cfg.datasets, infos, strict=True)):
        if d.val_cases >= len(info.cases):
            most = len(info.cases) - 1
            raise ConfigError(
                f"datasets[{i}] ({info.root}): val_cases = {d.val_cases} leaves none of its "
                f"{len(info.cases)} case(s) to train on; set val_cases = {most} or less for it "
                "(0: train on every case; with no validation case in any dataset the run exports "
                "the last epoch of each stage)"
            )


def run(
    cfg: TrainConfig,
    *,
    base_dir: Path,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    command: list[str] | None = None,
) -> Path:
    """Train according to ``cfg``; returns the run folder. ``stop_after_epochs`` ends early (a budget).

    Every dataset is checked first (:meth:`DatasetInfo.read`), and the ``init`` model's card and a
    MoME run's label space read, before the run folder is made or anything built. The main process
    then holds the run folder's lock (:func:`.state.folder_lock`) for the whole run, so that a second
    run into the same folder stops at once with an OutputError.
    """
    infos = [DatasetInfo.read(d.path) for d in cfg.datasets]
    init_path, init_card = read_init(cfg.init) if cfg.init else (None, None)
    if cfg.init is None:  # a model to build from the registry: an unknown name leaves no run folder
        try:
            get_config(cfg.model)
        except ValueError as error:
            raise ConfigError(f"model {cfg.model!r}: {error}") from None
    if cfg.exclusion_weight != 1.0 and not is_mome(cfg, init_card):
        raise ConfigError(
            f"exclusion_weight = {cfg.exclusion_weight}: read by mome models only (a softmax head already "
            "counts a voxel of one structure against every other class of its task)"
        )
    # MoME: the union of the structures (a fine-tune: the init model's classes, then any new ones)
    space = label_space(cfg, infos, init_card) if is_mome(cfg, init_card) else None
    out = cfg.resolved_output_dir(base_dir)
    lock = folder_lock(out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        return _run(cfg, infos, init_path, init_card, space, out, resume, stop_after_epochs, command)


def _run(
    cfg: TrainConfig,
    infos: list[DatasetInfo],
    init_path: Path | None,
    init_card,
    space: LabelSpace | None,
    out: Path,
    resume: bool,
    stop_after_epochs: int | None,
    command: list[str] | None,
) -> Path:
    rank, world, device = distributed_setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main_process = rank == 0
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        logger.setLevel(logging.INFO)  # the m4oe CLI configures the root logger for warnings only
    # A dense init model has no experts: the datasets' expert names only label them, as from scratch.
    if init_card is not None and init_card.architecture.is_moe:
        names = tuple(e.name for e in init_card.experts)
        unknown = sorted({d.expert for d in cfg.datasets} - set(names))
        if unknown:
            raise ConfigError(
                f"init {cfg.init}: the datasets' experts {unknown} are not among its {list(names)}"
            )
        if not cfg.expert_order:
            cfg = dataclasses.replace(cfg, expert_order=names)  # every expert, data or not
    cfg = inherit_preprocessing(cfg, init_card)
    labels = task_labels(cfg, infos) if space is None else {cfg.task_names[0]: list(space.labels)}
    values = None if space is None else {cfg.task_names[0]: space.names}
    expert_modalities(cfg, infos, init_card)  # a config error found now, not at the first validation
    check_validation_cases(cfg, infos)
    splits = [split_cases(info, d.val_cases) for d, info in zip(cfg.datasets, infos, strict=True)]
    train_cases = [split["train"] for split in splits]
    validating = any(d.val_cases > 0 for d in cfg.datasets)
    if init_card is not None:  # a fine-tuned model normalises exactly as its parent did
        params = init_intensity(init_card)
    else:
        params = {"ct": ct_intensity_params(infos, train_cases, out / "cache"), "mr": DEFAULT_PARAMS["mr"]}

    torch.manual_seed(cfg.seed)
    if "experts" in cfg.model_overrides or "tasks" in cfg.model_overrides:
        raise ConfigError("model_overrides: experts and tasks come from the datasets, not from overrides")
    tasks = tuple((name, len(labels[name]) + 1) for name in cfg.task_names)
    try:
        if space is not None and init_card is None:
            model = build_mome(cfg, space)
        elif space is not None:  # a MoME fine-tune: the init model's classes, then any new ones
            model = build_mome_from(init_card, cfg, space, **init_overrides(cfg, init_card))
        elif init_card is not None:
            model = build_model(
                init_card.architecture,
                experts=cfg.experts if init_card.architecture.is_moe else (),
                tasks=tasks,
                **init_overrides(cfg, init_card),
            )
        else:
            dense = not get_config(cfg.model).is_moe
            model = build_model(
                cfg.model, experts=() if dense else cfg.experts, tasks=tasks, **cfg.model_overrides
            )
    except ValueError as error:  # e.g. one expert for a mixture model, an unknown override
        raise ConfigError(f"model {cfg.model!r} with experts {list(cfg.experts)}: {error}") from None
    if any("context" in (s.kind, s.trainable) for s in cfg.stages) and model.cfg.gate_context == "none":
        raise ConfigError(
            "a stage trains only the gates' context (kind or trainable 'context'); the model has none "
            "(model_overrides.gate_context)"
        )
    if any(s.trainable == "experts" for s in cfg.stages) and not model.cfg.is_moe:
        raise ConfigError(f"trainable = 'experts' needs a mixture-of-experts model; {cfg.model!r} is dense")
    if not model.cfg.is_moe and len(cfg.experts) > 1:
        logger.info("dense model: the %d expert names only label the datasets", len(cfg.experts))
    if cfg.imagenet and not resume:
        report = load_imagenet_weights(model, cfg.imagenet)
        logger.info("ImageNet initialisation: %s", report.summary())
    init_sha256 = init_card.weights_sha256 if init_card is not None else None  # kept on --resume
    if init_path is not None and not resume:
        init_sha256 = load_initial_weights(model, init_path, labels)
        logger.info("initialised from %s (weights SHA-256 %s)", init_path, init_sha256)
    data = SliceData(
        list(cfg.datasets),
        infos,
        params,
        model.cfg.img_size,
        cfg.in_plane,
        cfg.target_spacing_mm,
        out / "cache",
        cfg.synth_settings(),
        label_lookups(cfg, infos) if space is None else None,
        model.cfg.neighbour_slices,
    )
    dataset_expert = [cfg.experts.index(d.expert) for d in cfg.datasets]
    if space is not None:  # per-class BCE + Dice over the structures each dataset labels
        module = MoMELoss(
            model,
            space,
            dataset_expert,
            cfg.ce_weight,
            cfg.dice_weight,
            cfg.exclusion_weight,
            cfg.deep_supervision,
        ).to(device)
    else:
        tasks_of = [d.task for d in cfg.datasets]
        module = StageLoss(
            model,
            dataset_expert,
            tasks_of,
            cfg.ce_weight,
            cfg.dice_weight,
            labelled_classes(cfg, infos),
            cfg.deep_supervision,
        ).to(device)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            parameter_groups(module),
            lr=cfg.stages[0].lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    else:
        # The fused kernel updates every tensor in one pass: 10 ms a step instead of 43 ms for the
        # embedded model's 6.5 M parameters on one CPU thread (358 tensors, per-tensor loop).
        optimizer = torch.optim.AdamW(
            parameter_groups(module),
            lr=cfg.stages[0].lr,
            weight_decay=cfg.weight_decay,
            fused=device.type in ("cpu", "cuda"),
        )
    # "seconds": training time of the earlier sessions of a resumed run (states written before it
    # was kept lack it), so that logs and the card count the whole run.
    position = {"stage": 0, "epoch": 0, "step": 0, "best": {}, "history": [], "seconds": 0.0}
    if resume:
        recover_state(out / "state")
        if not (out / "state").exists():
            raise FileNotFoundError(f"{out / 'state'}: nothing to resume")
        meta = load_state(out / "state", module, optimizer)
        position = {k: meta.get(k, 0.0) if k == "seconds" else meta[k] for k in position}
        logger.info(
            "resumed at stage %d epoch %d (step %d)", position["stage"], position["epoch"], position["step"]
        )
    # The weights' moving average (ema_decay): when kept, validation scores it and the export holds it.
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.module.requires_grad_(False)
        if resume and not load_ema(out / "state", ema.module):
            logger.info("the state holds no moving average of the weights: it starts from them now")
    net = ema.module if ema is not None else model  # the network validated and exported
    wrapped = DistributedDataParallel(module, find_unused_parameters=True) if world > 1 else module
    use_bf16 = cfg.amp == "bf16" or (
        cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    augmentation = build_augmentation(cfg.elastic_probability, cfg.augment_scale) if cfg.augment else None
    log_path = out / "train_log.csv"
    if main_process:
        _log_up_to(log_path, position["step"])
    provenance = {
        "command": " ".join(command or sys.argv),
        "config": portable_config(cfg.to_dict()),
        "seed": cfg.seed,
        "world_size": world,
        "data": {
            key: {"path": portable_path(info.root), "modality": info.modality, "train_cases": cases}
            for key, info, cases in zip(data_keys(infos), infos, train_cases, strict=True)
        },
        "init_weights_sha256": init_sha256,
        "lineage": lineage(init_card),
        "code_version": __version__,
        "torch": torch.__version__,
        "host": platform.platform(),
    }
    frozen = frozen_parameters(module, set(dataset_expert))
    # L2-SP (stages' anchor_weight): each weight the init model gave, beside its starting value.
    anchored = []
    if any(s.anchor_weight > 0 for s in cfg.stages):
        start_state = initial_state(init_path)
        anchored = [
            (p, start_state[name.removeprefix("model.")].to(device))
            for name, p in module.named_parameters()
            if name.startswith("model.") and name.removeprefix("model.") in start_state
        ]
    epochs_run = 0
    start = time.perf_counter() - position["seconds"]

    def export(metrics: dict) -> None:
        elapsed = round(time.perf_counter() - start, 1)
        card = build_card(
            cfg,
            net,
            infos,
            params,
            metrics=metrics,
            provenance=dict(provenance, training_seconds=elapsed),
            init_card=init_card,
            labels=labels,
            values=values,
        )
        export_model(net, card, out / "model", cfg.export_dtype)

    plan = BatchPlan.from_config(cfg, data, augmentation, rank)
    with BatchSource(plan, cfg.loader_workers) as batches:
        for stage_index, stage in enumerate(cfg.stages):
            if stage_index < position["stage"]:
                continue
            total_steps = stage.epochs * cfg.iterations_per_epoch
            for epoch in range(position["epoch"] if stage_index == position["stage"] else 0, stage.epochs):
                if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                    return out
                module.train()
                sums: dict[str, float] = {}
                for it in range(cfg.iterations_per_epoch):
                    step_in_stage = epoch * cfg.iterations_per_epoch + it
                    lr = stage_lr(stage, step_in_stage, total_steps, cfg.poly_power)
                    for group in optimizer.param_groups:
                        group["lr"] = group_lr(stage, group["name"], lr)
                    torch.manual_seed(step_seed(cfg.seed, rank, position["step"]))
                    images, targets, datasets, mask = batches.get(
                        position["step"],
                        stage.kind,
                        stage.mask_ratio,
                        last_step=position["step"] + total_steps - step_in_stage,
                    )
                    if model.cfg.in_chans == 3:
                        images = images.expand(-1, 3, -1, -1)
                    batch = [
                        t.to(device) if t is not None else None for t in (images, targets, datasets, mask)
                    ]
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss, stats = wrapped(
                            stage.kind,
                            *batch,
                            load_balance=stage.load_balance_weight,
                            routing=stage.routing_weight,
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if stage.anchor_weight > 0:
                        stats["anchor"] = add_anchor_gradient(anchored, stage.anchor_weight)
                    trainable = "context" if stage.kind == "context" else stage.trainable
                    for p in frozen[trainable]:  # no gradient: AdamW and SGD leave the parameter alone
                        p.grad = None
                    if cfg.grad_clip_norm > 0:  # gradients are already averaged over ranks here
                        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip_norm)
                        stats["grad_norm"] = float(norm)
                    optimizer.step()
                    if ema is not None:
                        ema.update(model)
                    position["step"] += 1
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                epochs_run += 1
                position.update(stage=stage_index, epoch=epoch + 1)
                means = {k: v / cfg.iterations_per_epoch for k, v in sums.items()}
                if not main_process:
                    continue
                record = {
                    "stage": stage_index,
                    "kind": stage.kind,
                    "epoch": epoch + 1,
                    "step": position["step"],
                    "lr": lr,
                    "seconds": round(time.perf_counter() - start, 1),
                    **means,
                }
                logger.info(
                    "stage %d (%s) epoch %d/%d %s",
                    stage_index,
                    stage.kind,
                    epoch + 1,
                    stage.epochs,
                    " ".join(f"{k}={v:.4f}" for k, v in means.items()),
                )
                last_epoch = epoch + 1 == stage.epochs
                # mim and context stages leave the segmentation as it was: nothing to validate or export.
                segmenting = stage.kind not in ("mim", "context")
                if segmenting and validating and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
                    card = build_card(
                        cfg,
                        net,
                        infos,
                        params,
                        metrics={},
                        provenance=provenance,
                        init_card=init_card,
                        labels=labels,
                        values=values,
                    )
                    results = validate(net, card, cfg, infos, device, stage.kind, space)
                    # Each set of held-out volumes counts once, however often its folder is listed.
                    view = log_view(results)
                    scores = [r["mean_dice"] for r in view.values() if r.get("mean_dice") is not None]
                    score = float(np.mean(scores)) if scores else None
                    record["val_mean_dice"] = round(score, 4) if score is not None else None
                    position["history"].append({"stage": stage_index, "epoch": epoch + 1, "val": results})
                    logger.info("validation mean Dice %s %s", record["val_mean_dice"], json.dumps(view))
                    for line in missed_warnings(results):
                        logger.warning(line)
                    # Each stage keeps its best epoch (export_epoch "best") or its last validated one
                    # ("last": when the validation cases do not stand for the data the model is for, as
                    # phantoms for a model trained on renders to segment patients); a later stage's
                    # export replaces an earlier one's, so what ships is the last stage's.
                    best = position["best"].get(str(stage_index), -1.0)
                    if score is not None and (score > best or cfg.export_epoch == "last"):
                        position["best"][str(stage_index)] = max(score, best)
                        selected = {"stage": stage_index, "epoch": epoch + 1, "mean_dice": round(score, 4)}
                        export(dict(validation=results, selected=selected))
                if segmenting and last_epoch and str(stage_index) not in position["best"]:
                    # Nothing scored this stage (no validation cases, e.g. one corrected case): its last
                    # epoch is what the run has, so that is exported, and the card says it was not chosen.
                    selected = {"stage": stage_index, "epoch": epoch + 1, "mean_dice": None}
                    note = "no validation cases: the last epoch"
                    export(dict(validation=None, selected=selected, note=note))
                _append_csv(log_path, record)
                position["seconds"] = round(time.perf_counter() - start, 1)
                meta = dict(position, config=cfg.to_dict())
                save_state(out / "state", module, optimizer, meta, None if ema is None else ema.module)
    if world > 1:
        dist.barrier()
    return out


LOG_FIELDS = (
    "stage",
    "kind",
    "epoch",
    "step",
    "lr",
    "seconds",
    "mim",
    "seg",
    "balance",
    "routing",
    "val_mean_dice",
    "grad_norm",
    "context",
)


@torch.no_grad()
def add_anchor_gradient(anchored: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> float:
    """Add the gradient of ``weight / 2 * sum((w - w0) ** 2)`` to each parameter ``w`` of
    ``anchored`` (pairs of a parameter and its init value ``w0``); returns ``sum((w - w0) ** 2)``.
    A parameter without a gradient this step (an expert no token reached) gets this one alone."""
    squares = []
    for p, start in anchored:
        diff = p.detach().float() - start
        squares.append(diff.square().sum())
        pull = (weight * diff).to(p.dtype)
        if p.grad is None:
            p.grad = pull
        else:
            p.grad.add_(pull)
    return float(torch.stack(squares).sum()) if squares else 0.0  # one device sync a step


def _append_csv(path: Path, record: dict) -> None:
    """One row per epoch; the columns are fixed so every stage kind fits one table."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(record)


def _log_up_to(path: Path, step: int) -> None:
    """Make the log follow the saved state: keep the rows of the epochs the state holds (``step``
    column at most ``step``, the state's step count; 0 for a run that starts afresh) and drop the
    others.

    Each epoch appends its row just before it saves the state, so a run killed between the two
    leaves a row that its state lacks (killed inside the append: a partial last line), and the
    resumed run writes that epoch's row again. The log is rewritten atomically, and only when a
    row is dropped, so a kill here leaves either log, both of which the next start repairs.
    """
    if not path.exists():
        return
    with open(path, newline="") as f:
        text = f.read()
    complete = [line + "\n" for line in text.split("\n")[:-1]]  # csv ends every row with \r\n
    if not complete:  # killed while writing the header
        path.unlink()
        return
    column = next(csv.reader(complete[:1])).index("step")

    def held(line: str) -> bool:
        value = next(csv.reader([line]))[column : column + 1]
        return bool(value) and value[0].isdigit() and int(value[0]) <= step

    kept = complete[:1] + [line for line in complete[1:] if held(line)]
    if "".join(kept) != text:
        write_atomic(path, partial(_write_text, text="".join(kept)), overwrite=True)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", newline="") as f:
        f.write(text)
