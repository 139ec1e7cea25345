"""A plain PyTorch training loop in the style of BDH's reference train.py, with bdh_fast's monitoring.

    python examples/plain_loop.py --data PATH --out_dir DIR --max_iters N
    tensorboard --logdir DIR

The five lines that mention telemetry are all the monitoring costs: every step's loss, learning
rate, global and (metrics="full") per-parameter gradient norms, step time and tokens/s, in TensorBoard and
metrics.jsonl, and the reference's `Step: ...` console line every 100 steps. They add no host sync
between flushes: the values stay on the device and reach the host in one copy every 10 steps.
Delete them and the loop runs as before. Any nn.Module works the same way; the model here is BDH,
small enough for a CPU.
"""

import argparse
import contextlib

import numpy as np
import torch

from bdh_fast.data import DEFAULT_CORPUS
from bdh_fast.model import BDH, BDHConfig
from bdh_fast.telemetry import Telemetry

BDH_CONFIG = BDHConfig(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
BLOCK_SIZE = 64
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default=str(DEFAULT_CORPUS), help="text file, read as bytes")
parser.add_argument("--out_dir", default="runs/plain_loop", help="where the logs go")
parser.add_argument("--max_iters", type=int, default=200)
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
torch.manual_seed(1337)
rng = np.random.default_rng(1337)

data = np.memmap(args.data, dtype=np.uint8, mode="r")
splits = {"train": data[: int(0.9 * len(data))], "val": data[int(0.9 * len(data)):]}


def get_batch(split):
    """Random windows of BLOCK_SIZE + 1 bytes: x, and y shifted by one; both (B, T)."""
    split_data = splits[split]
    offsets = rng.integers(0, len(split_data) - BLOCK_SIZE - 1, BATCH_SIZE)
    windows = np.stack([split_data[i:i + BLOCK_SIZE + 1] for i in offsets]).astype(np.int64)  # (B, T+1)
    windows = torch.from_numpy(windows).to(device)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


model = BDH(BDH_CONFIG).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
telemetry = Telemetry(model, optimizer, log_dir=args.out_dir, max_iters=args.max_iters, tokens_per_step=BATCH_SIZE * BLOCK_SIZE, metrics="full")
if device.type == "cuda":  # on a CPU, compiling costs more than a short run gains
    model = torch.compile(model)

for step in range(1, args.max_iters + 1):
    x, y = get_batch("train")
    with ctx:
        logits, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    telemetry.after_backward(loss)  # gradient norms, reduced on the device
    optimizer.step()
    telemetry.step(step)  # into the device buffer; a flush every 10 steps
telemetry.close()

print("Training done, now generating a sample")
model.eval()
prompt = torch.tensor([list(b"To be or ")], dtype=torch.long, device=device)  # (1, T0)
with torch.no_grad(), ctx:
    out = model.generate(prompt, max_new_tokens=100, top_k=3)  # (1, T0 + 100)
print(bytes(out[0].tolist()).decode(errors="backslashreplace"))
