"""A Weights & Biases run that holds every step exactly once, however often the run was resumed
(wandb_history.py), with a custom step axis and incrementally uploaded sample tables."""

from __future__ import annotations

import os
import pathlib
import secrets
import string
import sys
from typing import Any

from bdh_fast.checkpoint import atomic_write_bytes
from bdh_fast.errors import UserError
from bdh_fast.telemetry.backends import wandb_history
from bdh_fast.telemetry.backends.base import Backend, Histogram


def wandb_api_key_configured() -> bool:
    """Whether W&B credentials are configured, checked locally (environment, then netrc): no network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib.wbauth import wbnetrc  # what wandb.login itself reads

        return wbnetrc.read_netrc_auth(host=base_url) is not None
    except Exception:  # private module moved, or a malformed netrc: treat as not configured
        return False


def _init_run(wandb, **kwargs):
    """wandb.init, which also works when a wandb-core service inherited from a parent process
    (WANDB_SERVICE: a launcher script, a sweep agent, a test runner that used wandb itself) still holds
    this run's stream for a process that was killed (kill -9, the OOM killer) and is being resumed: that
    service answers "run ID ... is in use" forever, so this process starts a service of its own."""
    try:
        return wandb.init(**kwargs)
    except Exception as e:
        if "is in use" not in str(e) or not os.environ.get("WANDB_SERVICE"):
            raise
        print(f"wandb: run {kwargs.get('id')} is still held in the shared wandb-core service (WANDB_SERVICE) "
              f"by an earlier process; logging through a service of this process's own", file=sys.stderr,
              flush=True)
        wandb.teardown()  # closes the connection; a service this process does not own keeps running
        os.environ.pop("WANDB_SERVICE", None)
        return wandb.init(**kwargs)


class WandbBackend(Backend):
    """A W&B run. Every metric is plotted against the custom `step` metric rather than wandb's own
    `_step`: after a resume wandb ignores `step=` values below its last `_step`, which would drop the
    re-run steps; a custom axis keeps them.

    Resumed (`resume_step`: the first step this segment computes), it logs every step exactly once
    (wandb_history.py): what earlier segments already gave W&B is not logged again,
    and what they lost up to the checkpoint is backfilled from metrics.jsonl."""

    name = "wandb"
    STEP = "step"

    def __init__(
        self,
        run_dir: str,
        config: dict,
        project: str = "bdh-training",
        entity: str | None = None,
        run_name: str | None = None,
        mode: str = "auto",
        resume_step: int | None = None,
        log_checkpoints: bool = False,
    ):
        import wandb

        self._wandb = wandb
        self.log_checkpoints = log_checkpoints
        self._tables: dict[str, Any] = {}
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE", "")
            if env_mode in ("online", "offline", "disabled"):
                mode = env_mode
            else:
                mode = "online" if wandb_api_key_configured() else "offline"
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"wandb mode {mode!r} is not one of auto, online, offline, disabled")
        os.makedirs(run_dir, exist_ok=True)
        id_path = os.path.join(run_dir, "wandb_id.txt")
        run_id = None
        resume = resume_step is not None
        if resume and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        # {step: names} W&B already holds from earlier segments; read before init starts a new one.
        self._held: dict[int, set[str]] = {}
        if run_id is not None:
            try:
                self._held = wandb_history.logged_keys(run_dir, run_id)
            except Exception as e:
                print(f"warning: wandb: could not read what the earlier segments of run {run_id} logged "
                      f"({type(e).__name__}: {e}); W&B may show their last steps twice", file=sys.stderr,
                      flush=True)
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            # durable: a resume after a power loss must find the id, or it starts a second W&B run
            atomic_write_bytes(pathlib.Path(id_path), lambda tmp: tmp.write_text(run_id + "\n"))
        self.run = _init_run(
            wandb, project=project, entity=entity, name=run_name, config=config, dir=run_dir, mode=mode,
            id=run_id, resume="allow" if resume else None, reinit="create_new", save_code=False,
        )
        self.run.define_metric(self.STEP)
        self.run.define_metric("*", step_metric=self.STEP)
        if resume:
            # Steps up to the checkpoint are in metrics.jsonl (flushed to disk before it was written).
            wandb_history.backfill(run_dir, resume_step - 1, self._held,
                                   lambda method, args: getattr(self, method)(*args))
            self._held = {step: names for step, names in self._held.items() if step >= resume_step}
        if mode == "offline":
            print(f"wandb: logging offline (no API key configured, or mode offline); upload later with: "
                  f"wandb sync {self.run.settings.sync_dir}", file=sys.stderr, flush=True)

    def _held_at(self, step: int) -> set[str]:
        return self._held.get(step, set()) if self._held else set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        held = self._held_at(step)
        values = {k: float(v) for k, v in metrics.items() if k not in held}
        if values:
            self.run.log({**values, self.STEP: step})

    def log_text(self, name: str, text: str, step: int) -> None:
        self.log_table(name, ["step", "text"], [[step, text]], step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if name in self._held_at(step):
            return
        # One table per name that grows across calls; INCREMENTAL uploads only the new rows each time.
        table = self._tables.get(name)
        if table is None or list(table.columns) != list(columns):
            table = self._tables[name] = self._wandb.Table(columns=list(columns), log_mode="INCREMENTAL")
        for row in rows:
            table.add_data(*row)
        self.run.log({name: table, self.STEP: step})

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        if name in self._held_at(step):
            return
        np_histogram = hist.to_numpy_histogram(max_bins=self._wandb.Histogram.MAX_LENGTH)  # wandb's limit
        self.run.log({name: self._wandb.Histogram(np_histogram=np_histogram), self.STEP: step})

    def log_artifact(self, path: str, name: str, kind: str) -> None:
        if not self.log_checkpoints:
            return
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        artifact = self._wandb.Artifact(safe, type=kind)
        artifact.add_file(path)  # copied to staging now, so a later overwrite of `path` is harmless
        self.run.log_artifact(artifact)

    def log_alert(self, title: str, text: str, step: int) -> None:
        self.log_table("alerts", ["step", "title", "text"], [[step, title, text]], step)  # kept offline too
        if "alerts" in self._held_at(step):
            return
        try:  # an email or Slack message online; nothing to send offline
            self.run.alert(title=title, text=text, level=self._wandb.AlertLevel.WARN)
        except Exception:
            pass  # the table row above holds it

    def finish(self) -> None:
        self.run.finish()

