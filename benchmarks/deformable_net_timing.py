"""Wall time of the sam-net network pass and of one training step (issue 12's speed figures).

    python benchmarks/deformable_net_timing.py [--threads 1,2] [--size 100,100,70] [--steps 5] [--device cpu]

* network pass: a full-thorax pair at 4 mm is ~100 x 100 x 70 voxels (an 8 M-voxel CT of 0.7 x 0.7 x 2.5 mm);
  the input is padded to the network stride, the default network (configs/deformable/sam_net_chest.yaml) runs
  once without gradients (best of 3 after one warm-up pass), per torch thread count;
* training step: the default config's batch (one 64 x 64 x 48 crop, LNCC + embedding + diffusion loss), forward
  and backward on a synthetic pair (simulating and embedding a pool pair, ~30 s on 2 cores, is not included:
  it happens once per ``refresh_every`` steps and shows in the trainer's log.csv ``seconds`` at those steps).

Prints one line per measurement. Random inputs: the pass time does not depend on the content.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from regsam.register.net.loss import LossConfig, RegistrationLoss
from regsam.register.net.model import NetConfig, build_network, predict_residual
from regsam.register.net.train import load_config

CONFIG = Path(__file__).resolve().parents[1] / "regsam" / "configs" / "deformable" / "sam_net_chest.yaml"


def pass_seconds(net: torch.nn.Module, shape: tuple[int, int, int], channels: int, device: torch.device) -> float:
    x = torch.randn((1, channels) + shape, device=device)
    with torch.no_grad():
        predict_residual(net, x, x)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            predict_residual(net, x, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


def step_seconds(cfg: dict, net_cfg: NetConfig, steps: int, device: torch.device) -> float:
    net = build_network(net_cfg).to(device)
    loss_fn = RegistrationLoss(LossConfig(**cfg["loss"])).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, y, z = cfg["pairs"]["crop_size"]
    k = int(cfg["pairs"]["embed_components"])
    b = int(cfg["train"]["batch_size"])
    batch = {"fixed": torch.randn(b, 1, z, y, x), "moving": torch.randn(b, 1, z, y, x),
             "body": torch.ones(b, 1, z, y, x), "fixed_features": torch.randn(b, k, z, y, x),
             "moving_features": torch.randn(b, k, z, y, x)}
    batch = {key: v.to(device) for key, v in batch.items()}
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        result = loss_fn(batch, predict_residual(net, batch["fixed"], batch["moving"]))
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--size", default="100,100,70", help="x,y,z voxels at the network spacing")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg, _ = load_config(CONFIG)
    net_cfg = NetConfig.from_dict(cfg["model"])
    device = torch.device(args.device)
    stride = net_cfg.stride
    size = [int(v) for v in args.size.split(",")]
    shape = tuple(-(-n // stride) * stride for n in size[::-1])  # padded (D, H, W)
    net = build_network(net_cfg).to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    print(f"network {list(net_cfg.nb_features)}, {params} weights, input {size} -> padded {list(shape[::-1])} (x, y, z)")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        seconds = pass_seconds(net, shape, 1 + net_cfg.feature_channels, device)
        print(f"pass  threads={threads} device={device.type}: {seconds:.2f} s")
        step = step_seconds(cfg, net_cfg, args.steps, device)
        print(f"train step threads={threads} device={device.type}: {step:.2f} s (batch {cfg['train']['batch_size']}, "
              f"crop {cfg['pairs']['crop_size']})")


if __name__ == "__main__":
    main()
