"""The histopathology study on the federation engine: data plan, rounds, logging, checkpoints, final test.

Each rank hosts one or more hospitals (:mod:`fedsim.engine`). A round trains
the participating hospitals, aggregates with ONE all-reduce of the flat
weight buffer, validates the global model at every hospital, gathers small
dicts of scalar figures on rank 0, and commits the round with its checkpoint.
Only weights and counts cross ranks; images, labels and paths never do.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler

from data.cache import CachedPairs, collate_batch
from fedsim import checkpoint, plots
from fedsim.aggregate import allreduce_mean_, fedavg
from fedsim.client import StepSettings, make_optimizer, predict, train_epoch
from fedsim.config import ConfigError, RunConfig
from fedsim.datasetup import (
    DataPlan,
    HospitalData,
    device_normalizer,
    plan_data,
    write_data_report,
    write_hospital_report,
    write_run_files,
)
from fedsim.dist import (
    DistInfo,
    HungRanks,
    broadcast_object,
    broadcast_weights,
    gather_figures,
    share_figures,
    wait_for_all,
)
from fedsim.engine import Client, Engine, EngineSettings, Faults
from fedsim.evaluate import final_report, image_level, summaries
from fedsim.flat import flatten
from fedsim.logger import RunLogger, format_round, write_json
from fedsim.privacy import Privacy
from fedsim.seeding import derive_seed, generator
from fedsim.strategies import ServerOptimizer
from models import build_model

log = logging.getLogger(__name__)


class Federation:
    """One rank's view of a federated (or centralized) run."""

    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out)
        self.plan: DataPlan = plan_data(cfg, info, self.out)
        self.settings = _step_settings(cfg, info)
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
        self.engine = self._build_engine() if self.federated else None
        self.pooled = None if self.federated else self._pooled_client()
        self.logger = RunLogger(self.out, enabled=info.is_main)
        self.writer = checkpoint.BackgroundWriter()
        self.start_round = self._maybe_resume()
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

    def _loader(self, dataset, indices=None, batches=None) -> tuple[DataLoader, torch.Generator]:
        """A loader for the whole run (persistent workers) whose sampler is re-seeded every round.

        ``batches``: a batch sampler made from the generator (DP-SGD's Poisson batches) instead of shuffling.
        """
        shuffle = torch.Generator()
        workers = self.cfg.data.num_workers
        common = {
            "collate_fn": collate_batch,
            "num_workers": workers,
            "pin_memory": self.info.device.type == "cuda",
            "persistent_workers": workers > 0,
        }
        if batches is not None:
            return DataLoader(dataset, batch_sampler=batches(shuffle), **common), shuffle
        sampler = (
            RandomSampler(dataset, generator=shuffle)
            if indices is None
            else SubsetRandomSampler(indices.tolist(), generator=shuffle)
        )
        return DataLoader(dataset, batch_size=self.cfg.train.batch_size, sampler=sampler, **common), shuffle

    def _build_engine(self) -> Engine:
        t = self.cfg.train
        # Sample counts decide the aggregation weights, so every rank learns every hospital's (a count, no data).
        mine = {h.name: len(h.dataset("train")) for h in self.plan.mine}
        counts = {name: n for g in share_figures(mine) for name, n in g.items()}
        ordered = [counts[h] for h in self.plan.hospitals]
        self.privacy = None
        if t.dp.enabled or t.secure_aggregation:
            self.privacy = Privacy(
                t.dp,
                t.secure_aggregation,
                t.secagg,
                ordered,
                t.batch_size,
                t.local_epochs,
                t.rounds,
                t.clients_per_round,
                t.seed,
                self.info.device,
                self.info.world_size,
            )
            if self.info.is_main:
                log.info(self.privacy.describe())
        clients = []
        for hospital in self.plan.mine:
            sampler = (
                (lambda gen, i=hospital.index: self.privacy.batch_sampler(i, gen))
                if self.privacy is not None and self.privacy.level == "sample"
                else None
            )
            loader, shuffle = self._loader(hospital.dataset("train"), batches=sampler)
            clients.append(
                Client(hospital.index, hospital.name, mine[hospital.name], loader, reseed=shuffle.manual_seed)
            )
        settings = EngineSettings(
            seed=t.seed,
            local_epochs=t.local_epochs,
            lr=t.lr,
            weight_decay=t.weight_decay,
            mu=t.mu,
            local_optimizer=t.local_optimizer,
            clients_per_round=t.clients_per_round,
            client_optimizer=t.client_optimizer,
            client_state_device=t.client_state_device,
            algorithm=t.algorithm,
            faults=Faults(t.dropout, t.straggler, tuple(t.faulty_hospitals)),
        )
        server = ServerOptimizer(
            t.server_optimizer, t.server_lr, t.server_momentum, tuple(t.server_betas), t.server_tau
        )
        engine = Engine(
            self.model,
            self.flat,
            clients,
            self.plan.hospitals,
            ordered,
            settings,
            self.settings,
            server,
            show_progress=self.info.is_main,
            privacy=self.privacy,
        )
        engine.forward = self.forward_model
        return engine

    def _pooled_client(self) -> Client:
        """Centralized mode: this rank's equal shard of the pooled training data (every step all-reduces
        gradients, so every rank must take the same number of steps)."""
        union = CachedPairs(self.plan.all_train_folders)
        usable = len(union) // self.info.world_size * self.info.world_size
        shard = np.arange(self.info.rank, usable, self.info.world_size)
        loader, shuffle = self._loader(union, shard)
        return Client(self.info.rank, "pooled", len(shard), loader, reseed=shuffle.manual_seed)

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
            raise ConfigError(
                f"{chosen} was written by a run with another config; use a new --out, or the same settings to resume"
            )
        if state.get("hospitals") != list(self.plan.hospitals):  # e.g. another data.num_hospitals
            raise ConfigError(
                f"{chosen} was written by a federation of {', '.join(state.get('hospitals') or ['?'])}; "
                f"this run has {', '.join(self.plan.hospitals)}: use a new --out, or the same hospitals"
            )
        self.model.load_state_dict(state["model"])  # copies into the flat views, keeping them bound
        if self.engine is not None:
            self.engine.load_state_dict(state.get("engine", {}))
            for client in self.engine.clients:
                client.state = checkpoint.load_client_state(self.out, client.name, state["round"])
        start = state["round"] + 1
        if self.info.is_main:
            log.info("resuming after round %d from %s", start, chosen)
        return start

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
        """One communication round: local work and aggregation, validation, figures, commit."""
        started = time.perf_counter()
        clients, timings = self._federated_work(r) if self.federated else self._centralized_work(r)
        began = time.perf_counter()
        validated, matrices = self._validate_global(clients)
        timings["validation"] = timings.get("validation", 0.0) + time.perf_counter() - began
        self._gather_and_log(r, validated, matrices, timings, started)

    def _federated_work(self, r: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        outcomes = self.engine.round(
            r,
            validate=lambda c: self._validate(self._hospital(c.name))["accuracy"],
            after_epoch=lambda c, rr: self._simulate_faults(c.name, rr),
            before_aggregation=lambda: self._wait_for_clients(r),
            before_refresh=self._wait_for_checkpoint,
        )
        checksum = _checksum(self.flat.reduced)
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

    def _centralized_work(self, r: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Epochs over this rank's shard of the pooled data, gradients averaged over the ranks at every step."""
        cfg, client = self.cfg.train, self.pooled
        began = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, r, self.info.rank, "torch"))  # dropout layers
        optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.local_optimizer)
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
        self._wait_for_clients(r)
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
            "weights_checksum": _checksum(self.flat.reduced),
            "layer_drift": [],
        }
        return [{**figures, "hospital": h.name} for h in self.plan.mine], seconds

    def _hospital(self, name: str) -> HospitalData:
        return next(h for h in self.plan.mine if h.name == name)

    def _wait_for_clients(self, r: int) -> None:
        """Meet every rank before aggregating; a hung one ends the run with its hospitals named, not a hang."""
        try:
            wait_for_all(self.cfg.train.timeout_s, f"round {r + 1} aggregation")
        except HungRanks as err:
            hosted = [i for k in err.ranks for i in range(k, len(self.plan.hospitals), self.info.world_size)]
            names = [self.plan.hospitals[i] for i in hosted] if self.federated else []
            who = f"hospital(s) {', '.join(names)} " if names else ""
            hint = "" if err.crashed else " (raise train.timeout_s if local training is that slow)"
            raise HungRanks(err.ranks, f"{who}{err}{hint}", err.crashed) from None

    def _simulate_faults(self, name: str, r: int) -> None:
        """The fault simulations of the config for one hospital (a diverging client, a hang, a crash)."""
        cfg = self.cfg.train
        if name in cfg.simulate_nan:
            with torch.no_grad():
                self.flat.params.fill_(float("nan"))
        if cfg.simulate_hang == f"{name}:{r + 1}":
            log.warning("simulated hang: hospital %s stops responding in round %d", name, r + 1)
            time.sleep(10**7)
        self._simulate_crash(r, "training", name)

    def _simulate_crash(self, r: int, point: str, name: str | None = None) -> None:
        """train.simulate_crash = "HOSPITAL:ROUND[:POINT]": SIGKILL this process there, once per run directory.

        POINT is ``training`` (the default: in the middle of local training),
        ``before-checkpoint`` (the round's metrics and events written, its
        checkpoint not), ``checkpoint`` (the checkpoint written but not yet
        renamed into place) or ``after-checkpoint``; the last three concern
        rank 0, the writer of the run files.
        """
        parts = self.cfg.train.simulate_crash.split(":")
        names = [name] if name else [h.name for h in self.plan.mine] if self.federated else []
        if len(parts) < 2 or parts[0] not in names or parts[1] != str(r + 1):
            return
        where = parts[2] if len(parts) > 2 else "training"
        marker = self.out / (f".crashed-{parts[0]}-round{r + 1}" + ("" if where == "training" else f"-{where}"))
        if where != point or marker.exists():
            return
        marker.touch()
        if point == "checkpoint":  # checkpoint.save_atomic kills the process once the file is written
            checkpoint.CRASH_DURING.add(str(checkpoint.round_path(self.out / "checkpoints", r)))
            return
        log.warning("simulated crash: killing this process (SIGKILL) in round %d (%s)", r + 1, point)
        os.kill(os.getpid(), signal.SIGKILL)

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

    def _gather_and_log(
        self, r: int, clients: list[dict[str, Any]], matrices: list, timings: dict[str, float], started: float
    ) -> None:
        layer_drift = [c.pop("layer_drift", []) for c in clients]
        # Confusion-matrix counts are summary figures: no image or per-sample value leaves the hospital.
        gathered = gather_figures({"clients": clients, "layer_drift": layer_drift, "val_cm": matrices})
        if not self.info.is_main:
            return
        all_clients = sorted(
            (c for g in gathered for c in g["clients"]), key=lambda c: self.plan.hospitals.index(c["hospital"])
        )
        # The round's checkpoint is its commit point: its metrics line and events are written first, and a
        # rerun drops whatever was logged past the last checkpoint (RunLogger.start), so a crash anywhere
        # in this sequence leaves exactly one line and one event step per committed round.
        # The previous round's checkpoint, written while this one ran (the engine may have waited for it already).
        timings["checkpoint"] = timings.get("checkpoint", 0.0) + self.writer.wait()
        record = {
            "round": r,
            "rounds": self.cfg.train.rounds,
            "mode": self.cfg.train.mode,
            "clients": all_clients,
            "global": _global_figures(all_clients),
            "seconds": _seconds(timings, started),
        }
        self.logger.log_round(record)
        self.logger.scalar("global/lr", self.cfg.train.lr, r)
        pooled = [np.asarray(m) for g in gathered for m in g["val_cm"] if m is not None]
        if pooled:
            self.logger.confusion_matrix("global/val_confusion_matrix", sum(pooled), self.plan.class_names, r)
        for g in gathered:
            for c, drift in zip(g["clients"], g["layer_drift"]):
                if drift:
                    self.logger.histogram(f"client/{c['hospital']}/layer_drift", np.asarray(drift), r)
        for c in all_clients:
            if "epsilon" in c:
                self.logger.scalar(f"client/{c['hospital']}/epsilon", c["epsilon"], r)
        self.logger.flush()
        self._simulate_crash(r, "before-checkpoint")
        self._simulate_crash(r, "checkpoint")
        state = self._state(r)  # the round's weights, copied once; written while the next round trains

        def commit() -> None:
            checkpoint.save_round(state, self.out, r, self.cfg.train.keep_checkpoints)
            self._simulate_crash(r, "after-checkpoint")

        self.writer.submit(commit)
        log.info(format_round(record))

    def _state(self, r: int) -> dict[str, Any]:
        """What a checkpoint holds: the global model, the server's state, the run's identity (round -1: initial)."""
        state = {
            "model": self._weights_copy(),
            "round": r,
            "config": self.cfg.to_dict(),
            "config_digest": self.cfg.digest(),
            "class_names": list(self.plan.class_names),
            "hospitals": list(self.plan.hospitals),
        }
        if self.engine is not None:
            state["engine"] = self.engine.state_dict()
        return state

    def _weights_copy(self) -> dict[str, torch.Tensor]:
        """The model's state dict copied once into a host buffer kept for the run (views of it), so a round's
        checkpoint costs one copy and no allocation; the previous checkpoint's write has finished. On CPU the
        engine's snapshot of the round already is such a copy of the global parameters: no pass at all."""
        views = self.engine.state_views() if self.engine is not None else None
        if views is not None:
            return views
        flat = self.flat.data
        if getattr(self, "_saved", None) is None:
            self._saved = torch.empty(flat.shape, dtype=flat.dtype, device="cpu")
        self._saved.copy_(flat)
        base, size = flat.data_ptr(), flat.element_size()
        out = {}
        for key, value in self.model.state_dict().items():
            offset = (value.data_ptr() - base) // size
            inside = value.device == flat.device and value.dtype == flat.dtype and 0 <= offset < flat.numel()
            out[key] = (
                self._saved.as_strided(value.shape, value.stride(), offset)
                if inside
                else value.detach().to("cpu", copy=True)
            )
        return out

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
        per_grade = self.cfg.train.xai_per_grade
        if per_grade <= 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        from fedsim.xai import write_overlays

        # Each hospital writes its own events file: images stay where they were made.
        with SummaryWriter(str(self.out / "tb" / f"xai-{hospital.name}")) as writer:
            write_overlays(
                self.model,
                dataset,
                self.out / "xai" / hospital.name,
                self.plan.class_names,
                self.info.device,
                per_grade=per_grade,
                writer=writer,
                step=self.cfg.train.rounds,
                normalizer=self.settings.normalizer,
            )

    def finish(self) -> None:
        """Test the final global model at every hospital; rank 0 writes final.json."""
        self.writer.wait()  # the last round's checkpoint is on disk before the run reports
        results = []
        for hospital in self.plan.mine:
            if "test" not in hospital.folders:
                continue
            if self.engine is not None:  # under FedBN, the hospital's own tensors
                self.engine.load_client(next(c for c in self.engine.clients if c.name == hospital.name))
            dataset = hospital.dataset("test")
            probs, labels, idx = self._predict(dataset)
            results.append(
                {
                    "hospital": hospital.name,
                    **summaries(
                        dataset,
                        probs,
                        labels,
                        idx,
                        self.plan.class_names,
                        counts=True,
                        seed=derive_seed(self.cfg.train.seed, 0, hospital.index, "bootstrap") % 2**32,
                    ),
                }
            )
            self._explain(hospital, dataset)
        gathered = gather_figures({"results": results})
        if self.info.is_main:
            per_hospital = [res for g in gathered for res in g["results"]]
            final = final_report(per_hospital, self.plan.class_names)
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
                "final test accuracy %.3f (image level) over %d images; per hospital %s",
                final["accuracy"],
                final["n_images"],
                ", ".join(
                    f"{name} {acc:.3f}" if acc is not None else f"{name} -"
                    for name, acc in final["per_hospital_accuracy"].items()
                ),
            )
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
    return StepSettings(
        device=info.device,
        amp_dtype=torch.bfloat16 if precision == "bf16" else None,
        channels_last=cuda,
        mu=cfg.train.mu,
        mixup_alpha=cfg.train.mixup_alpha,
        augment=cfg.data.augment,
        grad_accum=cfg.train.grad_accum,
        normalizer=device_normalizer(cfg),
    )


def _checksum(values: torch.Tensor) -> list[float]:
    """Sums of a strided sample of the aggregated weights (every 61st, and every 61st from the 30th), in float64:
    equal on every rank iff the ranks agree (up to chance), at a small fraction of a pass over the weights."""
    v = values.detach()
    return [float(v[::61].sum(dtype=torch.float64)), float(v[30::61].sum(dtype=torch.float64))]


def _global_figures(clients: list[dict[str, Any]]) -> dict[str, Any]:
    trained = [c for c in clients if c["status"] in ("trained", "straggler")]
    drifts = [c["drift"] for c in trained if c.get("drift") is not None]
    accs = [(c["val_acc_global"], c["num_val"]) for c in clients if c.get("val_acc_global") is not None]
    losses = [(c["train_loss"], c["num_samples"]) for c in clients if c.get("train_loss") is not None]
    weighted = lambda pairs: sum(a * n for a, n in pairs) / max(sum(n for _, n in pairs), 1) if pairs else None  # noqa: E731
    return {
        "val_acc": weighted(accs),
        "train_loss": weighted(losses),
        "samples_aggregated": sum(c["num_samples"] for c in trained),
        "drift_spread": (max(drifts) - min(drifts)) if drifts else None,
        "update_norm": clients[0].get("global_update_norm") if clients else None,
        "clients_aggregated": len(trained),
    }


def _seconds(timings: dict[str, float], started: float) -> dict[str, float]:
    """The round's time by phase; ``other`` is the rest, so the parts sum to ``total``."""
    total = time.perf_counter() - started
    parts = {
        key: timings.get(key, 0.0)
        for key in ("local_training", "validation", "aggregation", "diagnostics", "checkpoint")
    }
    return {"total": total, **parts, "other": max(total - sum(parts.values()), 0.0)}
