"""The round loop: local epochs -> drift -> fedavg -> evaluate -> gather -> log -> checkpoint.

Every rank runs this same loop for its own hospital. The only things that
cross ranks are the model's flat buffer (one all-reduce per round) and one
small dict of scalar figures per client (gathered to rank 0 for logging).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler

from data.cache import CachedPairs, collate_batch
from fedsim import checkpoint, metrics
from fedsim.aggregate import allreduce_mean_, fedavg
from fedsim.client import StepSettings, local_proximal, make_optimizer, predict, train_epoch
from fedsim.config import ConfigError, RunConfig
from fedsim.datasetup import (DataPlan, HospitalData, device_normalizer, plan_data, write_data_report,
                              write_hospital_report, write_run_files)
from fedsim.dist import DistInfo, HungRanks, broadcast_object, broadcast_weights, gather_figures, wait_for_all
from fedsim.drift import DriftTracker
from fedsim.evaluate import levels, summaries
from fedsim.flat import flatten, is_batchnorm
from fedsim.logger import RunLogger, format_round, write_json
from fedsim.seeding import derive_seed, generator
from models import build_model

log = logging.getLogger(__name__)


@dataclass
class ClientState:
    """What one rank trains on this round."""

    hospital: HospitalData | None  # None in centralized mode (the rank trains on a shard of the union)
    train: CachedPairs
    train_indices: np.ndarray | None


class Federation:
    """One rank's view of a federated (or centralized) run."""

    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out)
        self.plan: DataPlan = plan_data(cfg, info, self.out)
        self.settings = _step_settings(cfg, info)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model.backbone, cfg.model.scales, len(self.plan.class_names),
                            cfg.model.hidden, cfg.model.dropout, cfg.model.pretrained)
        model = model.to(info.device)
        self.flat = flatten(model, local_bn=cfg.train.bn == "local", channels_last=self.settings.channels_last)
        self.model = model
        self.forward_model = torch.compile(model) if cfg.train.compile else model
        self.client = self._client_state()
        self.shuffle = torch.Generator()
        self.train_loader = self._build_train_loader()
        self._eval_loaders: dict[str, DataLoader] = {}
        self.logger = RunLogger(self.out, enabled=info.is_main)
        self.start_round = self._maybe_resume()
        if info.is_main:  # only now: a refused resume leaves the old run's files as they were
            checkpoint.remove_stale_temporaries(self.out)  # writes that died with an earlier attempt
            self.logger.start(self.start_round)  # what that attempt logged past its last checkpoint goes
            write_run_files(cfg, self.plan, self.out)
        if self.start_round == 0:
            broadcast_weights(self.flat.data)  # the same seed builds the same model, unless nodes run other builds
        self._report_data()

    # ---- set-up -------------------------------------------------------------------------

    def _client_state(self) -> ClientState:
        if self.cfg.train.mode == "federated":
            hospital = self.plan.mine[0]
            return ClientState(hospital, hospital.dataset("train"), None)
        union = CachedPairs(self.plan.all_train_folders)
        # Equal shards: every rank must take the same number of steps, since each step all-reduces gradients.
        usable = len(union) // self.info.world_size * self.info.world_size
        shard = np.arange(self.info.rank, usable, self.info.world_size)
        return ClientState(None, union, shard)

    def _maybe_resume(self) -> int:
        """Continue after the newest usable checkpoint of this config, if the run directory has one.

        Rank 0 picks the file (falling back past corrupt ones) and every rank
        loads that same file, so a restarted group agrees on the round.
        """
        chosen = None
        if self.info.is_main:
            found = checkpoint.load_latest_usable(self.out)
            chosen = str(found[1]) if found else None
        chosen = broadcast_object(chosen)
        if chosen is None:
            if self.cfg.train.resume:
                log.warning("--resume: no checkpoint in %s, starting from round 1", self.out)
            return 0
        state = checkpoint.load(chosen)
        if state.get("config_digest") != self.cfg.digest():
            raise ConfigError(f"{chosen} was written by a run with another config; "
                              f"use a new --out, or the same settings to resume")
        if state.get("hospitals") != list(self.plan.hospitals):  # e.g. another world size or data.num_hospitals
            raise ConfigError(f"{chosen} was written by a federation of {', '.join(state.get('hospitals') or ['?'])}; "
                              f"this run has {', '.join(self.plan.hospitals)}: use a new --out, or the same ranks")
        self.model.load_state_dict(state["model"])  # copies into the flat views, keeping them bound
        self._load_local_state(state["round"])
        start = state["round"] + 1
        if self.info.is_main:
            log.info("resuming after round %d from %s", start, chosen)
        return start

    def _report_data(self) -> None:
        """Each hospital keeps its detailed skip report (with file paths) on its own disk; only counts cross ranks."""
        for hospital in self.plan.mine:
            write_hospital_report(self.out, hospital)
        reports = gather_figures({"hospitals": [h.name for h in self.plan.mine],
                                  "report": [h.report.counts_only() for h in self.plan.mine]})
        if self.info.is_main:
            flat_reports = [{"hospital": name, "report": rep} for r in reports
                            for name, rep in zip(r["hospitals"], r["report"])]
            write_data_report(self.out, flat_reports, self.plan.scan_report)

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """All remaining rounds, then the final test evaluation."""
        for round_index in range(self.start_round, self.cfg.train.rounds):
            self.round(round_index)
        self.finish()

    def round(self, r: int) -> None:
        """One communication round."""
        started = time.perf_counter()
        torch.manual_seed(derive_seed(self.cfg.train.seed, r, self.info.rank, "torch"))  # dropout layers
        start = self.flat.data.detach().clone()  # the global model this round starts from, statistics included
        anchor = start[self.flat.global_slice]  # its global weights: the FedProx anchor
        figures = self._local_work(r, start)
        tracker = DriftTracker(self.flat, anchor)
        if self.cfg.train.mode == "federated":
            figures["val_acc_local"] = self._validate(self.client.hospital)["accuracy"]
        weight = figures["num_samples"] if figures["status"] in ("ok", "straggler") else 0
        self._wait_for_clients(r)
        total = fedavg(self.model, weight, bn=self.cfg.train.bn)
        figures.update(tracker.after_aggregation(self.flat))
        figures["weights_checksum"] = _checksum(self.flat.reduced)
        self._gather_and_log(r, figures, total, tracker, started)

    def _wait_for_clients(self, r: int) -> None:
        """Meet every client before aggregating; a hung one ends the run with its name, not a hang."""
        try:
            wait_for_all(self.cfg.train.timeout_s, f"round {r + 1} aggregation")
        except HungRanks as err:
            names = [self.plan.hospitals[k] for k in err.ranks if self.cfg.train.mode == "federated" and k < len(self.plan.hospitals)]
            who = f"hospital(s) {', '.join(names)} " if names else ""
            hint = "" if err.crashed else " (raise train.timeout_s if local training is that slow)"
            raise HungRanks(err.ranks, f"{who}{err}{hint}", err.crashed) from None

    def _local_work(self, r: int, start: torch.Tensor) -> dict[str, Any]:
        """Local epochs, unless this client drops out; partial work for a straggler."""
        cfg, hospital = self.cfg.train, self.client.hospital
        figures: dict[str, Any] = {"rank": self.info.rank, "num_samples": self._num_train(), "status": "ok"}
        if hospital is not None:
            figures["hospital"] = hospital.name
        epochs = cfg.local_epochs
        if hospital is not None and (not cfg.faulty_hospitals or hospital.name in cfg.faulty_hospitals):
            chance = np.random.default_rng(derive_seed(cfg.seed, r, self.info.rank, "participation"))
            dropped, straggles = chance.random() < cfg.dropout, chance.random() < cfg.straggler
            if dropped:
                figures.update(status="dropped", epochs=0, train_loss=None, prox=0.0)
                return figures
            if straggles and cfg.local_epochs > 1:
                epochs = int(chance.integers(1, cfg.local_epochs))
                figures["status"] = "straggler"
        figures.update(self._train_epochs(r, epochs, start))
        if not figures.pop("finite"):
            figures["status"] = "diverged"
        return figures

    def _train_epochs(self, r: int, epochs: int, start: torch.Tensor) -> dict[str, Any]:
        cfg = self.cfg.train
        federated = cfg.mode == "federated"
        optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)  # clients keep no state across rounds
        prox_anchor = start[self.flat.global_slice] if federated and cfg.mu > 0 else None
        hook = None if federated or self.info.world_size == 1 else allreduce_mean_
        rng = generator(cfg.seed, r, self.info.rank, "augment")
        # Data order of every epoch of this round follows from (seed, round, client) alone.
        self.shuffle.manual_seed(derive_seed(cfg.seed, r, self.info.rank, "shuffle"))
        result = None
        for epoch in range(epochs):
            loader = self.train_loader
            desc = f"round {r + 1}/{cfg.rounds} epoch {epoch + 1}/{epochs}"
            result = train_epoch(self.forward_model, self.flat, optimizer, loader, prox_anchor, self.settings, rng,
                                 grad_hook=hook, desc=desc, show=self.info.is_main)
            self._simulate_faults(r)
            if not result.finite:
                break
        finite = result.finite and bool(torch.isfinite(self.flat.data).all())
        if not finite:
            # A diverged client restarts from the global model and sits this round out. Its BatchNorm
            # statistics went non-finite with the weights (a forward pass in train mode), so all is restored.
            with torch.no_grad():
                self.flat.data.copy_(start)
            log.warning("local update is not finite (loss %s): contributing weight 0 this round", result.loss)
        return {"epochs": epochs, "train_loss": result.loss if finite else None, "finite": finite,
                "prox": local_proximal(self.flat, prox_anchor, cfg.mu)}

    def _simulate_faults(self, r: int) -> None:
        """The fault simulations of the config (a diverging client, a crashing hospital)."""
        cfg, hospital = self.cfg.train, self.client.hospital
        if hospital is None:
            return
        if hospital.name in cfg.simulate_nan:
            with torch.no_grad():
                self.flat.params.fill_(float("nan"))
        if cfg.simulate_hang == f"{hospital.name}:{r + 1}":
            log.warning("simulated hang: this hospital stops responding in round %d", r + 1)
            time.sleep(10**7)
        self._simulate_crash(r, "training")

    def _simulate_crash(self, r: int, point: str) -> None:
        """train.simulate_crash = "HOSPITAL:ROUND[:POINT]": SIGKILL this process there, once per run directory.

        POINT is ``training`` (the default: in the middle of local training),
        ``before-checkpoint`` (the round's metrics and events written, its
        checkpoint not), ``checkpoint`` (the checkpoint written but not yet
        renamed into place) or ``after-checkpoint``; the last three concern
        rank 0, the writer of the run files.
        """
        hospital = self.client.hospital
        parts = self.cfg.train.simulate_crash.split(":")
        if hospital is None or parts[:2] != [hospital.name, str(r + 1)]:
            return
        where = parts[2] if len(parts) > 2 else "training"
        marker = self.out / (f".crashed-{hospital.name}-round{r + 1}" + ("" if where == "training" else f"-{where}"))
        if where != point or marker.exists():
            return
        marker.touch()
        if point == "checkpoint":  # checkpoint.save_atomic kills the process once the file is written
            checkpoint.CRASH_DURING.add(str(checkpoint.round_path(self.out / "checkpoints", r)))
            return
        log.warning("simulated crash: killing this process (SIGKILL) in round %d (%s)", r + 1, point)
        os.kill(os.getpid(), signal.SIGKILL)

    def _build_train_loader(self) -> DataLoader:
        """One loader for the whole run (persistent workers); its sampler is re-seeded every round."""
        client, cfg = self.client, self.cfg
        if client.train_indices is None:
            sampler = RandomSampler(client.train, generator=self.shuffle)
        else:
            sampler = SubsetRandomSampler(client.train_indices.tolist(), generator=self.shuffle)
        workers = cfg.data.num_workers
        return DataLoader(client.train, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_batch,
                          num_workers=workers, pin_memory=self.info.device.type == "cuda",
                          persistent_workers=workers > 0)

    def _num_train(self) -> int:
        client = self.client
        return len(client.train) if client.train_indices is None else len(client.train_indices)

    # ---- evaluation and logging ----------------------------------------------------------

    def _predict(self, dataset: CachedPairs):
        key = ",".join(map(str, dataset.folders))
        if key not in self._eval_loaders:
            self._eval_loaders[key] = DataLoader(dataset, batch_size=self.cfg.train.batch_size * 2,
                                                 collate_fn=collate_batch, num_workers=self.cfg.data.num_workers,
                                                 pin_memory=self.info.device.type == "cuda",
                                                 persistent_workers=self.cfg.data.num_workers > 0)
        return predict(self.forward_model, self._eval_loaders[key], self.settings)

    def _validate(self, hospital: HospitalData) -> dict[str, Any]:
        """Image-level accuracy, image count and confusion matrix on the hospital's validation split."""
        if "val" not in hospital.folders:
            return {"accuracy": None, "n": 0, "confusion_matrix": None}
        dataset = hospital.dataset("val")
        probs, labels, idx = self._predict(dataset)
        return image_level(dataset, probs, labels, idx, len(self.plan.class_names))

    def _gather_and_log(self, r: int, figures: dict[str, Any], total: int, tracker: DriftTracker, started: float) -> None:
        clients, matrices = [], []
        hospitals = [self.client.hospital] if self.cfg.train.mode == "federated" else self.plan.mine
        for hospital in hospitals:
            val = self._validate(hospital)
            clients.append({**figures, "hospital": hospital.name, "val_acc_global": val["accuracy"], "num_val": val["n"]})
            matrices.append(val["confusion_matrix"])
        # Confusion-matrix counts are summary figures: no image or per-sample value leaves the hospital.
        gathered = gather_figures({"clients": clients, "layer_drift": tracker.layer_drift(), "val_cm": matrices})
        self._save_local_state(r)
        if not self.info.is_main:
            return
        all_clients = [c for g in gathered for c in g["clients"]]
        record = {"round": r, "rounds": self.cfg.train.rounds, "mode": self.cfg.train.mode,
                  "clients": all_clients, "global": _global_figures(all_clients, total),
                  "seconds": time.perf_counter() - started}
        # The round's checkpoint is its commit point: its metrics line and events are written first, and a
        # rerun drops whatever was logged past the last checkpoint (RunLogger.start), so a crash anywhere
        # in this sequence leaves exactly one line and one event step per committed round.
        self.logger.log_round(record)
        self.logger.scalar("global/lr", self.cfg.train.lr, r)
        pooled = [np.asarray(m) for g in gathered for m in g["val_cm"] if m is not None]
        if pooled:
            self.logger.confusion_matrix("global/val_confusion_matrix", sum(pooled), self.plan.class_names, r)
        for rank, g in enumerate(gathered):  # centralized ranks beyond the hospital count hold none
            name = g["clients"][0]["hospital"] if g["clients"] else f"rank{rank}"
            self.logger.histogram(f"client/{name}/layer_drift", np.asarray(g["layer_drift"]), r)
        self.logger.flush()
        self._simulate_crash(r, "before-checkpoint")
        self._simulate_crash(r, "checkpoint")
        self._checkpoint(r)
        self._simulate_crash(r, "after-checkpoint")
        log.info(format_round(record))

    def _checkpoint(self, r: int) -> None:
        state = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "round": r, "config": self.cfg.to_dict(), "config_digest": self.cfg.digest(),
                 "class_names": list(self.plan.class_names), "hospitals": list(self.plan.hospitals)}
        checkpoint.save_round(state, self.out, r, self.cfg.train.keep_checkpoints)

    def _local_folder(self) -> Path:
        return self.out / "clients" / f"rank{self.info.rank}"

    def _save_local_state(self, r: int) -> None:
        """Under FedBN each client's BatchNorm tensors are its own: saved by that rank, one file per round.

        One more file is kept than global checkpoints: a rank writes round r
        before rank 0 writes the global round r, and a resume may fall back
        past a corrupt global checkpoint to any one that is kept.
        """
        if self.cfg.train.bn != "local":
            return
        bn_modules = {name for name, m in self.model.named_modules() if is_batchnorm(m)}
        local = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k.rsplit(".", 1)[0] in bn_modules}
        checkpoint.save_keeping_last({"round": r, "model": local}, self._local_folder(), r,
                                     self.cfg.train.keep_checkpoints + 1)

    def _load_local_state(self, r: int) -> None:
        if self.cfg.train.bn != "local":
            return
        state = checkpoint.load(checkpoint.round_path(self._local_folder(), r))
        self.model.load_state_dict(state["model"], strict=False)

    def _explain(self, hospital: HospitalData, dataset: CachedPairs) -> None:
        """Grad-CAM panels of the final model on this hospital's own test images (they never leave it)."""
        per_grade = self.cfg.train.xai_per_grade
        if per_grade <= 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        from fedsim.xai import write_overlays

        # Each hospital writes its own events file: images stay where they were made.
        with SummaryWriter(str(self.out / "tb" / f"xai-{hospital.name}")) as writer:
            write_overlays(self.model, dataset, self.out / "xai" / hospital.name, self.plan.class_names,
                           self.info.device, per_grade=per_grade, writer=writer, step=self.cfg.train.rounds,
                           normalizer=self.settings.normalizer)

    def finish(self) -> None:
        """Test the final global model at every hospital; rank 0 writes final.json."""
        results = []
        for hospital in self.plan.mine:
            if "test" not in hospital.folders:
                continue
            dataset = hospital.dataset("test")
            probs, labels, idx = self._predict(dataset)
            results.append({"hospital": hospital.name,
                            **summaries(dataset, probs, labels, idx, self.plan.class_names, counts=True,
                                        seed=derive_seed(self.cfg.train.seed, 0, hospital.index, "bootstrap") % 2**32)})
            self._explain(hospital, dataset)
        gathered = gather_figures({"results": results})
        if self.info.is_main:
            per_hospital = [res for g in gathered for res in g["results"]]
            final = final_report(per_hospital, self.plan.class_names)
            write_json(self.out / "final.json", final)
            cm = np.asarray(final["image"]["confusion_matrix"])
            metrics.save_confusion_matrix_png(cm, self.plan.class_names, self.out / "confusion_matrix.png",
                                              title="final global model, test split, image level")
            self.logger.confusion_matrix("global/test_confusion_matrix", cm, self.plan.class_names, self.cfg.train.rounds)
            log.info("final test accuracy %.3f (image level) over %d images; per hospital %s",
                     final["accuracy"], final["n_images"], final["per_hospital_accuracy"])
        self.logger.close()


def _step_settings(cfg: RunConfig, info: DistInfo) -> StepSettings:
    cuda = info.device.type == "cuda"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if cfg.train.compile and not cuda:
        log.info("torch.compile on CPU: expect a long first step")
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed patch sizes: autotuned convolutions pay off at once
    return StepSettings(device=info.device, amp_dtype=torch.bfloat16 if precision == "bf16" else None,
                        channels_last=cuda, mu=cfg.train.mu, mixup_alpha=cfg.train.mixup_alpha,
                        augment=cfg.data.augment, grad_accum=cfg.train.grad_accum, normalizer=device_normalizer(cfg))


def _checksum(values: torch.Tensor) -> list[float]:
    """Sums of all and of every other aggregated weight, accumulated in float64 without a copy:
    equal on every rank iff the ranks agree (up to chance)."""
    v = values.detach()
    return [float(v.sum(dtype=torch.float64)), float(v[1::2].sum(dtype=torch.float64))]


def _global_figures(clients: list[dict[str, Any]], total: int) -> dict[str, Any]:
    drifts = [c["drift"] for c in clients if c.get("drift") is not None and c["status"] != "dropped"]
    accs = [(c["val_acc_global"], c["num_val"]) for c in clients if c.get("val_acc_global") is not None]
    losses = [(c["train_loss"], c["num_samples"]) for c in clients if c.get("train_loss") is not None]
    weighted = lambda pairs: sum(a * n for a, n in pairs) / max(sum(n for _, n in pairs), 1) if pairs else None  # noqa: E731
    return {"val_acc": weighted(accs), "train_loss": weighted(losses), "samples_aggregated": total,
            "drift_spread": (max(drifts) - min(drifts)) if drifts else None,
            "update_norm": clients[0].get("global_update_norm") if clients else None,
            "clients_aggregated": sum(c["status"] in ("ok", "straggler") for c in clients)}


def image_level(dataset: CachedPairs, probs: np.ndarray, labels: np.ndarray, idx: np.ndarray,
                num_classes: int) -> dict[str, Any]:
    """Image-level accuracy and confusion matrix: each image's patch probabilities averaged."""
    if len(idx) == 0:
        return {"accuracy": None, "n": 0, "confusion_matrix": None}
    image = levels(dataset, probs, labels, idx)["image"]
    cm = metrics.confusion_matrix(image["y"], image["probs"].argmax(1), num_classes)
    return {"accuracy": metrics.accuracy(cm), "n": len(image["y"]), "confusion_matrix": cm.tolist()}


def final_report(per_hospital: list[dict[str, Any]], class_names) -> dict[str, Any]:
    """Pool the hospitals' counts into overall figures with the keys of eval.json.

    Only aggregate counts crossed ranks: confusion matrices (overall, per
    magnification) and each hospital's patient-bootstrap replicates, which
    summed replicate by replicate give a bootstrap stratified by hospital.
    """
    out: dict[str, Any] = {}
    for level in ("image", "patch"):
        counts = [h[level].pop("counts") for h in per_hospital]
        mags: dict[str, np.ndarray] = {}
        for c in counts:
            for mag, cm in c["per_magnification"].items():
                mags[mag] = mags.get(mag, 0) + np.asarray(cm)
        boots = [np.asarray(c["bootstrap"]) for c in counts if len(c["bootstrap"])]
        out[level] = metrics.summary_from_counts(
            sum(np.asarray(c["confusion_matrix"]) for c in counts), class_names, per_magnification=mags,
            per_hospital_accuracy={h["hospital"]: h[level]["accuracy"] for h in per_hospital},
            bootstrap=sum(boots) if len(boots) == len(counts) else None)
    out["image"]["n_images"] = out["n_images"] = out["image"]["n"]
    out["patch"]["n_patches"] = out["n_patches"] = out["patch"]["n"]
    out["accuracy"] = out["image"]["accuracy"]
    out["per_hospital_accuracy"] = out["image"]["per_hospital_accuracy"]
    out["hospitals"] = {h["hospital"]: {"image": h["image"], "patch": h["patch"]} for h in per_hospital}
    return out
