"""Run under torchrun by test_distributed.py: the real CLI (bdh_fast.train.main) on each rank, with
instruments the test reads afterwards: each flush's local (pre-reduction) losses and the number of
our collectives it made, written to $BDH_TEST_OUT/rank<r>.json. $BDH_TEST_FAIL_AT=<rank>:<step>
makes that rank raise at that step."""

import json
import os
import sys

import torch.distributed as dist

from bdh_fast import train
from bdh_fast.telemetry.buffer import StepBuffer

rank = int(os.environ["RANK"])
collectives = {"n": 0}
flushes = []


def counted(fn):
    def wrapper(*args, **kwargs):
        collectives["n"] += 1
        return fn(*args, **kwargs)
    return wrapper


# Every Python-level collective, DDP's buffer broadcast (_broadcast_coalesced) included; DDP's
# gradient all-reduce runs in its C++ reducer and is the one collective a step may make.
for name in ("all_reduce", "all_gather_object", "all_gather", "broadcast", "reduce", "barrier",
             "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast_object_list", "_broadcast_coalesced"):
    if hasattr(dist, name):
        setattr(dist, name, counted(getattr(dist, name)))
step_collectives = {}
real_train_step = train.Trainer.train_step


def counted_train_step(self, step):
    before = collectives["n"]
    real_train_step(self, step)
    step_collectives[step] = collectives["n"] - before


train.Trainer.train_step = counted_train_step

real_flush = StepBuffer.flush


def flush(self, reduce=None):
    n = len(self.steps)
    steps, local = list(self.steps), self.values[:n, 0].tolist()
    before = collectives["n"]
    rows = real_flush(self, reduce)
    if n:
        flushes.append({"steps": steps, "local_loss": local, "collectives": collectives["n"] - before})
    return rows


StepBuffer.flush = flush

fail_at = os.environ.get("BDH_TEST_FAIL_AT")
if fail_at:
    fail_rank, fail_step = map(int, fail_at.split(":"))
    real_step = train.Trainer.train_step  # (already counted_train_step)

    def failing_step(self, step):
        if rank == fail_rank and step == fail_step:
            raise RuntimeError(f"injected failure at step {step}")
        return real_step(self, step)

    train.Trainer.train_step = failing_step

try:
    code = train.main(sys.argv[1:])
finally:
    with open(os.path.join(os.environ["BDH_TEST_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(flushes, f)
    with open(os.path.join(os.environ["BDH_TEST_OUT"], f"rank{rank}-steps.json"), "w") as f:
        json.dump(step_collectives, f)
sys.exit(code)
