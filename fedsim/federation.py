"""The histopathology study on the federation engine: data plan, rounds, logging, checkpoints, final test.

Each rank hosts one or more hospitals (:mod:`fedsim.engine`). A round trains
the participating hospitals, aggregates with ONE all-reduce of the flat
weight buffer, validates the global model at every hospital, gathers small
dicts of scalar figures on rank 0, and commits the round with its checkpoint.
Only weights and counts cross ranks; images, labels and paths never do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.cache import CachedPairs, collate_batch
from fedsim import checkpoint, plots
from fedsim.aggregate import allreduce_mean_, fedavg
from fedsim.assembly import build_engine, pooled_client, step_settings
from fedsim.client import make_optimizer, predict, round_lr, train_epoch
from fedsim.config import RunConfig
from fedsim.datasetup import (
    DataPlan,
    HospitalData,
    plan_data,
    write_data_report,
    write_hospital_report,
    write_predictions,
    write_run_files,
)
from fedsim.dist import (
    DistInfo,
    broadcast_weights,
    gather_figures,
)
from fedsim.engine import Client
from fedsim.evaluation.levels import final_report, image_level, levels, summaries
from fedsim.faults import FaultDrills
from fedsim.flat import flatten
from fedsim.logger import RunLogger, format_round, write_json
from fedsim.records import global_figures, round_seconds, weights_checksum
from fedsim.resume import resume_round
from fedsim.seeding import derive_seed, generator
from models import build_model

log = logging.getLogger(__name__)


class Federation:
    """One rank's view of a federated (or centralized) run."""

    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out)
        self.plan: DataPlan = plan_data(cfg, info, self.out)
        self.settings = step_settings(cfg, info.device)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(
            cfg.model.backbone,
            cfg.model.scales,
            len(self.plan.class_names),
            cfg.model.hidden,
            cfg.model.dropout,
            cfg.model.pretrained,
            cfg.norm,
        )
        model = model.to(info.device)
        self.flat = flatten(model, local_bn=cfg.train.bn == "local", channels_last=self.settings.channels_last)
        self.model = model
        self.forward_model = torch.compile(model) if cfg.train.compile else model
        self._eval_loaders: dict[str, DataLoader] = {}
        self.federated = cfg.train.mode == "federated"
        self.engine = build_engine(cfg, info, self.plan, model, self.flat, self.settings) if self.federated else None
        if self.engine is not None:
            self.engine.forward = self.forward_model
        self.pooled = None if self.federated else pooled_client(cfg, info, self.plan)
        mine = [h.name for h in self.plan.mine] if self.federated else []
        self.drills = FaultDrills(cfg, self.out, self.flat, self.plan.hospitals, mine, info.world_size)
        self.logger = RunLogger(self.out, enabled=info.is_main)
        self.writer = checkpoint.BackgroundWriter()
        self._host_copy = checkpoint.HostCopy()
        self.start_round = resume_round(cfg, info, self.out, self.plan.hospitals, model, self.engine)
        if info.is_main:  # only now: a refused resume leaves the old run's files as they were
            checkpoint.remove_stale_temporaries(self.out)  # writes that died with an earlier attempt
            self.logger.start(self.start_round)  # what that attempt logged past its last checkpoint goes
            write_run_files(cfg, self.plan, self.out)
        if self.start_round == 0:
            broadcast_weights(self.flat.data)  # the same seed builds the same model, unless nodes run other builds
            if info.is_main:
                checkpoint.save_atomic(self._state(-1), self.out / "initial.pt")
        self._report_data()

    # ---- set-up -------------------------------------------------------------------------

    def _report_data(self) -> None:
        """Each hospital keeps its detailed skip report (with file paths) on its own disk; only counts cross ranks."""
        for hospital in self.plan.mine:
            write_hospital_report(self.out, hospital)
        reports = gather_figures(
            {"hospitals": [h.name for h in self.plan.mine], "report": [h.report.counts_only() for h in self.plan.mine]}
        )
        if self.info.is_main:
            flat_reports = [
                {"hospital": name, "report": rep} for r in reports for name, rep in zip(r["hospitals"], r["report"])
            ]
            write_data_report(self.out, flat_reports, self.plan.scan_report)

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """All remaining rounds, then the final test evaluation."""
        for round_index in range(self.start_round, self.cfg.train.rounds):
            if self.engine is not None and self.engine.privacy is not None and self.engine.privacy.run_spent():
                if self.info.is_main:
                    log.warning(
                        "round %d would pass train.dp.max_epsilon = %g: the run ends after round %d",
                        round_index + 1,
                        self.cfg.train.dp.max_epsilon,
                        round_index,
                    )
                break
            self.round(round_index)
        self.finish()

    def round(self, r: int) -> None:
        """One communication round, step by step: local work and aggregation, validation of the global model,
        the figures gathered on rank 0, the round's record and events, then its commit (the checkpoint).

        The checkpoint is the round's commit point: its metrics line and events are written first, and a rerun
        drops whatever was logged past the last checkpoint (RunLogger.start), so a crash anywhere in this
        sequence leaves exactly one line and one event step per committed round."""
        started = time.perf_counter()
        clients, timings = self._federated_work(r) if self.federated else self._centralized_work(r)
        began = time.perf_counter()
        validated, matrices = self._validate_global(clients)
        timings["validation"] = timings.get("validation", 0.0) + time.perf_counter() - began
        gathered = self._gather(validated, matrices)
        if not self.info.is_main:
            return
        # The previous round's checkpoint, written while this one ran (the engine may have waited for it already).
        timings["checkpoint"] = timings.get("checkpoint", 0.0) + self.writer.wait()
        record = self._record(r, gathered, timings, started)
        self.logger.log_round(record)
        self._write_events(r, record, gathered)
        self._commit(r)
        log.info(format_round(record))

    def _federated_work(self, r: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        outcomes = self.engine.round(
            r,
            validate=lambda c: self._validate(self._hospital(c.name))["accuracy"],
            after_epoch=lambda c, rr: self.drills.after_epoch(c.name, rr),
            before_aggregation=lambda: self.drills.wait_for_clients(r),
            before_refresh=self._wait_for_checkpoint,
        )
        checksum = weights_checksum(self.flat.reduced)
        clients = [
            {
                **o.figures,
                "hospital": c.name,
                "num_samples": c.num_samples,
                "rank": self.info.rank,
                "weights_checksum": checksum,
            }
            for c, o in zip(self.engine.clients, outcomes)
        ]
        self._save_client_states(
            r,
            [
                c
                for c, o in zip(self.engine.clients, outcomes)
                if o.figures["status"] not in ("not sampled", "dropped", "budget spent")
            ],
        )
        return clients, dict(self.engine.timings)

    def _wait_for_checkpoint(self) -> None:
        """The last round's checkpoint, written from views of the engine's snapshot, is on disk."""
        self.writer.wait()

    def _lr(self, r: int) -> float:
        """Round ``r``'s learning rate under ``train.lr_schedule``."""
        t = self.cfg.train
        return round_lr(t.lr, t.lr_schedule, r, t.rounds)

    def _centralized_work(self, r: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Epochs over this rank's shard of the pooled data, gradients averaged over the ranks at every step."""
        cfg, client = self.cfg.train, self.pooled
        began = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, r, self.info.rank, "torch"))  # dropout layers
        optimizer = make_optimizer(self.model, self._lr(r), cfg.weight_decay, cfg.local_optimizer)
        hook = None if self.info.world_size == 1 else allreduce_mean_
        rng = generator(cfg.seed, r, self.info.rank, "augment")
        client.reseed(derive_seed(cfg.seed, r, self.info.rank, "shuffle"))
        start = self.flat.global_params.detach().clone()
        result = None
        for epoch in range(cfg.local_epochs):
            result = train_epoch(
                self.forward_model,
                self.flat,
                optimizer,
                client.loader,
                None,
                self.settings,
                rng,
                grad_hook=hook,
                desc=f"round {r + 1}/{cfg.rounds} epoch {epoch + 1}",
                show=self.info.is_main,
            )
        seconds = {"local_training": time.perf_counter() - began}
        began = time.perf_counter()
        self.drills.wait_for_clients(r)
        # The weights agree already (averaged gradients); the BatchNorm statistics of the shards are averaged here.
        fedavg(self.model, client.num_samples if result.finite else 0)
        seconds["aggregation"] = time.perf_counter() - began
        with torch.no_grad():
            drift = float(torch.sub(self.flat.global_params, start).norm())
        status = "trained" if result.finite else "diverged"
        figures = {
            "rank": self.info.rank,
            "num_samples": client.num_samples,
            "status": status,
            "epochs": cfg.local_epochs,
            "train_loss": result.loss if result.finite else None,
            "prox": 0.0,
            "drift": drift,
            "weights_checksum": weights_checksum(self.flat.reduced),
            "layer_drift": [],
        }
        return [{**figures, "hospital": h.name} for h in self.plan.mine], seconds

    def _hospital(self, name: str) -> HospitalData:
        return next(h for h in self.plan.mine if h.name == name)

    # ---- evaluation and logging ----------------------------------------------------------

    def _predict(self, dataset: CachedPairs):
        key = ",".join(map(str, dataset.folders))
        if key not in self._eval_loaders:
            self._eval_loaders[key] = DataLoader(
                dataset,
                batch_size=self.cfg.train.batch_size * 2,
                collate_fn=collate_batch,
                num_workers=self.cfg.data.num_workers,
                pin_memory=self.info.device.type == "cuda",
                persistent_workers=self.cfg.data.num_workers > 0,
            )
        return predict(self.forward_model, self._eval_loaders[key], self.settings)

    def _validate(self, hospital: HospitalData) -> dict[str, Any]:
        """Image-level accuracy, image count and confusion matrix on the hospital's validation split."""
        if "val" not in hospital.folders:
            return {"accuracy": None, "n": 0, "confusion_matrix": None}
        dataset = hospital.dataset("val")
        probs, labels, idx = self._predict(dataset)
        return image_level(dataset, probs, labels, idx, len(self.plan.class_names))

    def _validate_global(self, clients: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list]:
        """The global model on every hosted hospital's validation split (under FedBN with its own tensors)."""
        out, matrices = [], []
        for figures in clients:
            hospital = self._hospital(figures["hospital"])
            if self.engine is not None:
                self.engine.load_client(next(c for c in self.engine.clients if c.name == hospital.name))
            val = self._validate(hospital)
            out.append({**figures, "val_acc_global": val["accuracy"], "num_val": val["n"]})
            matrices.append(val["confusion_matrix"])
        return out, matrices

    def _gather(self, clients: list[dict[str, Any]], matrices: list) -> list[dict[str, Any]]:
        """Every rank's client rows, layer drifts and validation confusion matrices, on rank 0 (empty elsewhere).
        Confusion-matrix counts are summary figures: no image or per-sample value leaves the hospital."""
        layer_drift = [c.pop("layer_drift", []) for c in clients]
        return gather_figures({"clients": clients, "layer_drift": layer_drift, "val_cm": matrices})

    def _record(self, r: int, gathered: list[dict[str, Any]], timings: dict[str, float], started: float) -> dict:
        """The round's record: every client's row in hospital order, the global figures, the time by phase."""
        all_clients = sorted(
            (c for g in gathered for c in g["clients"]), key=lambda c: self.plan.hospitals.index(c["hospital"])
        )
        return {
            "round": r,
            "rounds": self.cfg.train.rounds,
            "mode": self.cfg.train.mode,
            "clients": all_clients,
            "global": global_figures(all_clients),
            "seconds": round_seconds(timings, started),
        }

    def _write_events(self, r: int, record: dict, gathered: list[dict[str, Any]]) -> None:
        """The round's TensorBoard events: learning rate, pooled confusion matrix, layer drift, epsilon."""
        self.logger.scalar("global/lr", self._lr(r), r)
        pooled = [np.asarray(m) for g in gathered for m in g["val_cm"] if m is not None]
        if pooled:
            self.logger.confusion_matrix("global/val_confusion_matrix", sum(pooled), self.plan.class_names, r)
        for g in gathered:
            for c, drift in zip(g["clients"], g["layer_drift"]):
                if drift:
                    self.logger.histogram(f"client/{c['hospital']}/layer_drift", np.asarray(drift), r)
        for c in record["clients"]:
            if "epsilon" in c:
                self.logger.scalar(f"client/{c['hospital']}/epsilon", c["epsilon"], r)
        self.logger.flush()

    def _commit(self, r: int) -> None:
        """The round's checkpoint: its weights copied once, written in the background while the next round
        trains (the writer finishes one write before it starts the next, and before the run reports)."""
        self.drills.crash(r, "before-checkpoint")
        self.drills.crash(r, "checkpoint")
        state = self._state(r)

        def commit() -> None:
            checkpoint.save_round(state, self.out, r, self.cfg.train.keep_checkpoints)
            self.drills.crash(r, "after-checkpoint")

        self.writer.submit(commit)

    def _state(self, r: int) -> dict[str, Any]:
        """What a checkpoint holds: the global model, the server's state, the run's identity (round -1: initial)."""
        state = {
            "model": self._host_copy(self.model, self.flat, self.engine),
            "round": r,
            "config": self.cfg.to_dict(),
            "config_digest": self.cfg.digest(),
            "class_names": list(self.plan.class_names),
            "hospitals": list(self.plan.hospitals),
        }
        if self.engine is not None:
            state["engine"] = self.engine.state_dict()
        return state

    def _save_client_states(self, r: int, clients: list[Client]) -> None:
        """Each hospital's own state (FedBN tensors, optimizer, control variate), kept by the rank hosting it.

        One more file is kept than global checkpoints: a rank writes round r
        before rank 0 writes the global round r, and a resume may fall back
        past a corrupt global checkpoint to any one that is kept.
        """
        for client in clients:
            if client.state:
                checkpoint.save_client_state(
                    self.out, client.name, r, client.state, self.cfg.train.keep_checkpoints + 1
                )

    def _explain(self, hospital: HospitalData, dataset: CachedPairs) -> None:
        """Grad-CAM panels of the final model on this hospital's own test images (they never leave it)."""
        if self.cfg.train.xai_per_grade > 0:
            from fedsim.xai import write_hospital_overlays

            write_hospital_overlays(
                self.model,
                dataset,
                self.out,
                hospital.name,
                self.plan.class_names,
                self.info.device,
                per_grade=self.cfg.train.xai_per_grade,
                step=self.cfg.train.rounds,
                normalizer=self.settings.normalizer,
            )

    def _test(self, hospital: HospitalData, seed_index: int) -> dict[str, Any]:
        """The model now loaded on the hospital's test split: its summaries (with counts, for pooling); the
        image-level predictions go to the hospital's own folder (``predictions.csv``), never across ranks."""
        dataset = hospital.dataset("test")
        probs, labels, idx = self._predict(dataset)
        write_predictions(self.out, hospital.name, levels(dataset, probs, labels, idx)["image"])
        seed = derive_seed(self.cfg.train.seed, 0, seed_index, "bootstrap") % 2**32
        summary = summaries(dataset, probs, labels, idx, self.plan.class_names, counts=True, seed=seed)
        return {"hospital": hospital.name, **summary}

    def _test_heldout(self) -> dict[str, Any] | None:
        """Rank 0: the final global model on the held-out hospitals' test splits, pooled like final.json."""
        if not self.plan.heldout:
            return None
        if self.flat.local_bn:
            return {"accuracy": None, "reason": "FedBN keeps BatchNorm per hospital: no model for an unseen one"}
        results = [self._test(h, len(self.plan.hospitals) + k) for k, h in enumerate(self.plan.heldout)]
        return final_report(results, self.plan.class_names)

    def finish(self) -> None:
        """Test the final global model at every hospital (and rank 0 at the held-out ones); rank 0 writes
        final.json."""
        self.writer.wait()  # the last round's checkpoint is on disk before the run reports
        results = []
        for hospital in self.plan.mine:
            if "test" not in hospital.folders:
                continue
            if self.engine is not None:  # under FedBN, the hospital's own tensors
                self.engine.load_client(next(c for c in self.engine.clients if c.name == hospital.name))
            results.append(self._test(hospital, hospital.index))
            self._explain(hospital, hospital.dataset("test"))
        heldout = self._test_heldout() if self.info.is_main else None
        gathered = gather_figures({"results": results})
        if self.info.is_main:
            per_hospital = [res for g in gathered for res in g["results"]]
            per_hospital.sort(key=lambda res: self.plan.hospitals.index(res["hospital"]))
            final = final_report(per_hospital, self.plan.class_names)
            if heldout is not None:
                final["heldout"] = heldout
                final["heldout_accuracy"] = heldout["accuracy"]
            if self.engine is not None and self.engine.privacy is not None:
                final["privacy"] = self.engine.privacy.report(list(self.plan.hospitals))
            write_json(self.out / "final.json", final)
            cm = np.asarray(final["image"]["confusion_matrix"])
            plots.save_confusion_matrix_png(
                cm,
                self.plan.class_names,
                self.out / "confusion_matrix.png",
                title="final global model, test split, image level",
            )
            self.logger.confusion_matrix(
                "global/test_confusion_matrix", cm, self.plan.class_names, self.cfg.train.rounds
            )
            log.info(
                "final test accuracy %.3f (image level) over %d images; per hospital %s%s",
                final["accuracy"],
                final["n_images"],
                ", ".join(
                    f"{name} {acc:.3f}" if acc is not None else f"{name} -"
                    for name, acc in final["per_hospital_accuracy"].items()
                ),
                f"; held out {heldout['accuracy']:.3f}" if heldout and heldout["accuracy"] is not None else "",
            )
        self.logger.close()
